"""Shared test fixtures: the golden set (in the repository, tests/golden), a tiny random LION, and the CI
rule that a test may skip only for an allowed reason (tests/skip_policy.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester", "skip_policy"]

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "lion-a"  # the authors' outputs and stand-in files (tests/golden/README.md)
ASSETS = GOLDEN / "assets"
RAM_VOCABULARY = REPO / "tests" / "golden" / "ram"  # RAM's real tag list and thresholds


def golden_paths(visual_input: str = "all", tags: bool = True):
    from lion_mllm import OfficialPaths

    return OfficialPaths(vit_model=ASSETS / "eva_vit_g_tiny.pth", llm_model=ASSETS / "flan-t5-tiny",
                         bert_model=ASSETS / "bert-tiny-uncased", pretrained=ASSETS / "LION-FlanT5-tiny.pth",
                         ram_model=None, visual_input=visual_input, enable_semantic_tags=tags)


def pytest_sessionstart(session: pytest.Session) -> None:
    """One intra-op thread for the whole suite, from before the first fixture (see `one_thread`)."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs with one intra-op thread, and a test that sets its own count leaves one behind
    (modules that name this fixture in `usefixtures` say they rely on it). The suite's models are tiny,
    so a second thread only adds synchronisation: on this 2-core machine at load 8-9,
    `test_golden.py::test_greedy_and_beam_tokens[rec_a1-QFORMER-tags]` took 446 s with torch's default
    of 2 threads and 41 s with 1. Bit-identical comparisons also need one thread count throughout."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def golden_results() -> dict:
    return json.loads((GOLDEN / "outputs" / "results.json").read_text())


@pytest.fixture(scope="session")
def golden_spec() -> dict:
    return json.loads((GOLDEN / "spec.json").read_text())


def make_tiny_lion(visual_input: str = "all", tags: bool = True, seed: int = 0, attn_implementation: str = "sdpa"):
    """A random tiny LION (config preset `tiny`) with the golden set's tokenizers."""
    from lion_mllm import Lion, LionModel, LionProcessor
    from lion_mllm.model.config import tiny

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
