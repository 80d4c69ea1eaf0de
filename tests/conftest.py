"""Shared test fixtures: where `shared/` lies, the golden set, and a tiny random LION."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# CI puts shared/ beside the clone, as on a developer's machine; LION_MLLM_SHARED points elsewhere.
SHARED = Path(os.environ.get("LION_MLLM_SHARED") or REPO.parent / "shared")
GOLDEN = SHARED / "golden" / "lion-a"
ASSETS = GOLDEN / "assets"

# A test module that uses any of these names (or a golden fixture) needs the shared goldens.
_SHARED_NAMES = frozenset({"SHARED", "GOLDEN", "ASSETS", "golden_paths", "make_tiny_lion"})
_SHARED_FIXTURES = frozenset({"golden_results", "golden_spec", "tiny_lion"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without `shared/` (a clone on its own), the tests that need its goldens are skipped with the reason,
    and the rest of the suite still runs."""
    if GOLDEN.is_dir():
        return
    skip = pytest.mark.skip(reason=f"needs the shared golden set at {GOLDEN}, which is absent "
                                   "(clone beside shared/ or set LION_MLLM_SHARED)")
    for item in items:
        module = getattr(item, "module", None)
        if _SHARED_NAMES & set(vars(module) if module else ()) or _SHARED_FIXTURES & set(item.fixturenames):
            item.add_marker(skip)


def golden_paths(visual_input: str = "all", tags: bool = True):
    from lion_mllm import OfficialPaths

    return OfficialPaths(vit_model=ASSETS / "eva_vit_g_tiny.pth", llm_model=ASSETS / "flan-t5-tiny",
                         bert_model=ASSETS / "bert-tiny-uncased", pretrained=ASSETS / "LION-FlanT5-tiny.pth",
                         ram_model=None, visual_input=visual_input, enable_semantic_tags=tags)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    more threads only contend on a shared 2-core machine, and bit-identical comparisons need one thread
    count throughout the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def golden_results() -> dict:
    return json.loads((GOLDEN / "outputs" / "results.json").read_text())


@pytest.fixture(scope="session")
def golden_spec() -> dict:
    return json.loads((GOLDEN / "spec.json").read_text())


def make_tiny_lion(visual_input: str = "all", tags: bool = True, seed: int = 0, attn_implementation: str = "sdpa"):
    """A random tiny LION (config preset `tiny`) with the golden set's tokenizers."""
    from lion_mllm import Lion, LionModel, LionProcessor
    from lion_mllm.config import tiny

    torch.manual_seed(seed)
    config = tiny(visual_input=visual_input, enable_semantic_tags=tags)
    model = LionModel(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():  # make both routes and the soft prompt matter (defaults are 1/0 and zeros)
        for module in model.modules():
            if hasattr(module, "router_ratio1"):
                module.router_ratio1.uniform_(0.0, 2.0)
                module.router_ratio2.uniform_(0.0, 2.0)
            if hasattr(module, "up_proj"):
                module.up_proj.weight.normal_(0, 0.1)
        if tags:
            model.tag_prompt_embedding.normal_()
    processor = LionProcessor.from_dirs(config, ASSETS / "flan-t5-tiny", ASSETS / "bert-tiny-uncased")
    return Lion(model, processor)


@pytest.fixture(scope="session")
def tiny_lion():
    return make_tiny_lion()
