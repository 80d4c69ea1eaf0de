"""The CI skip rule (tests/skip_policy.py), run on small test files in a temporary folder: under
LION_MLLM_STRICT_SKIPS=1 only the allowed reasons skip, any other skip fails; without it, skips are skips."""

from __future__ import annotations

import pytest
from skip_policy import CUDA_REASON, STRICT_SKIPS_ENV

TESTS = f"""
import pytest

@pytest.fixture
def needs_a_program():
    pytest.skip("needs Java")

def test_allowed():
    pytest.skip({CUDA_REASON!r})

@pytest.mark.skipif(True, reason={CUDA_REASON!r})
def test_allowed_mark():
    pass

def test_other_reason():
    pytest.skip("Java is not installed")

@pytest.mark.skip(reason="flaky")
def test_marked():
    pass

def test_fixture_skips(needs_a_program):
    pass

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False

def test_passes():
    pass
"""

MISSING_IMPORT = """
import pytest
pytest.importorskip("a_module_that_is_not_installed")

def test_never_runs():
    pass
"""


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, strict: bool, **files: str) -> pytest.RunResult:
    if strict:
        monkeypatch.setenv(STRICT_SKIPS_ENV, "1")
    else:
        monkeypatch.delenv(STRICT_SKIPS_ENV, raising=False)
    pytester.makepyfile(**files)
    return pytester.runpytest("-p", "skip_policy", "-rA")


def outcomes(result: pytest.RunResult) -> dict[str, str]:
    """Each test's first outcome that is not "passed" (setup, call or teardown), or "passed"."""
    first: dict[str, str] = {}
    for report in result.reprec.getreports("pytest_runtest_logreport"):
        name = report.nodeid.split("::")[-1]
        if first.get(name, "passed") == "passed":
            first[name] = "xfailed" if hasattr(report, "wasxfail") else report.outcome
    return first


def test_strict_run_fails_every_skip_but_the_allowed_ones(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    result = run(pytester, monkeypatch, True, test_cases=TESTS)
    # A skip in setup (marks, fixtures) becomes a setup failure, which pytest counts as an error.
    result.assert_outcomes(passed=1, skipped=2, failed=1, errors=2, xfailed=1)
    assert outcomes(result) == {"test_allowed": "skipped", "test_allowed_mark": "skipped",
                                "test_other_reason": "failed", "test_marked": "failed",
                                "test_fixture_skips": "failed", "test_expected_failure": "xfailed",
                                "test_passes": "passed"}
    result.stdout.fnmatch_lines(["*test_other_reason (call) skipped ('Java is not installed'), "
                                 f"and {STRICT_SKIPS_ENV}=1 allows a skip only for: {CUDA_REASON}*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_strict_run_fails_a_module_skipped_while_collected(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    result = run(pytester, monkeypatch, True, test_missing=MISSING_IMPORT, test_fine="def test_fine():\n    pass\n")
    result.stdout.fnmatch_lines(["*collecting test_missing.py skipped*a_module_that_is_not_installed*"])
    assert result.ret == pytest.ExitCode.INTERRUPTED  # a collection error stops the run before any test


def test_without_the_variable_skips_stay_skips(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    result = run(pytester, monkeypatch, False, test_cases=TESTS, test_missing=MISSING_IMPORT)
    result.assert_outcomes(passed=1, skipped=6, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
