"""Which skips CI accepts: a pytest plugin (loaded by tests/conftest.py) that, when `.ci/run` sets
`LION_MLLM_STRICT_SKIPS=1`, turns every skip whose reason is not in `ALLOWED_SKIP_REASONS` into a failure.

A suite that passes by skipping checks nothing: a missing program (Java, Chromium), a missing extra or a
missing data file would otherwise show as an "s" in a green run. Outside CI the plugin does nothing, so a
developer without a GPU, Java or a browser still sees those tests skipped with their reason.

Covered: skips in a test, in its fixtures' setup and teardown, `skip`/`skipif` marks, and skips while a
module is collected (a module-level `pytest.importorskip` or `pytest.skip(allow_module_level=True)`), which
become collection errors. Expected failures (`xfail`) are not skips and are left alone.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

STRICT_SKIPS_ENV = "LION_MLLM_STRICT_SKIPS"

CUDA_REASON = "needs a CUDA device"
# The only reasons a test may skip for in CI: what the CI machine cannot be given by installing a package.
ALLOWED_SKIP_REASONS = frozenset({CUDA_REASON})

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
# pycocoevalcap tokenizes and scores METEOR/SPICE in Java; .ci/run installs it, so CI does not skip these.
needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="needs Java for pycocoevalcap (apt-get install default-jre-headless)")


def strict_skips() -> bool:
    return os.environ.get(STRICT_SKIPS_ENV) == "1"


def skip_reason(longrepr: object) -> str:
    """The reason a skip report carries: pytest stores a skip as (path, line, "Skipped: <reason>")."""
    message = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return message.removeprefix("Skipped: ")


def _disallowed(reason: str, where: str) -> str:
    return (f"{where} skipped ({reason!r}), and {STRICT_SKIPS_ENV}=1 allows a skip only for: "
            f"{', '.join(sorted(ALLOWED_SKIP_REASONS))}. Provide what it needs (see .ci/run) or fix the test.")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    if strict_skips() and report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report.longrepr)
        if reason not in ALLOWED_SKIP_REASONS:
            report.outcome = "failed"
            report.longrepr = _disallowed(reason, f"{item.nodeid} ({report.when})")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    report = yield
    if strict_skips() and report.skipped:
        reason = skip_reason(report.longrepr)
        if reason not in ALLOWED_SKIP_REASONS:
            report.outcome = "failed"
            report.longrepr = _disallowed(reason, f"collecting {collector.nodeid}")
    return report
