"""benchmarks/gpu_engine.py, the decode engine's GPU benchmark, runs here at tiny size on the CPU: it writes
one JSON with every field the GPU run will have, the engine's token ids equal transformers' `generate`'s
in float32 in every case (greedy and 5 beams, batch 1/8/32, exactly 20 new tokens, batches larger than
the slots run in waves), a compile failure falls back to the eager engine with the error recorded, and
a spent budget skips the remaining cases."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from lion_mllm import Lion
from lion_mllm.engine import DecodeEngine
from lion_mllm.model.config import tiny

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_engine.py"
NEW_TOKENS = 20


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_engine_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The script as the GPU machine runs it (a subprocess, PYTHONPATH=src), at tiny size on the CPU."""
    output = tmp_path_factory.mktemp("gpu_engine") / "tiny.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--device", "cpu", "--repeats", "1",
                           "--output", str(output)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {output}" in done.stdout
    return json.loads(output.read_text())


def test_the_report_records_the_run(report):
    for key in ("command", "date", "python", "torch", "transformers", "cuda", "card", "git_commit"):
        assert key in report
    assert report["device"] == "cpu" and report["size"] == "tiny" and report["dtype"] == "float32"
    assert "--size tiny" in report["command"]
    assert report["new_tokens"] == NEW_TOKENS and report["skipped"] == [] and report["goals"] is None
    assert report["model"]["decoder_step_weight_bytes"] > 0
    assert report["copy_bandwidth"]["bytes_per_s"] > 0


def test_the_slot_cache_size_is_stated(report):
    engine, lang = report["engine"], tiny().language
    assert engine["compile"] is False and engine["slots"] == Lion.MAX_SLOTS == engine["buckets"][-1]
    # slots x layers x heads x d_kv x (K and V) x (answer + encoder positions) x 4 bytes, and a small mask
    kv = engine["slots"] * lang.num_decoder_layers * lang.num_heads * lang.d_kv * 2 * (
        engine["max_length"] + engine["max_source_length"]) * 4
    assert kv <= engine["cache_bytes"] < kv * 1.01
    assert report["peak_memory"]["slot_cache_bytes"] == engine["cache_bytes"]
    assert report["peak_memory"]["max_allocated_bytes"] is None  # a GPU's only


def test_every_case_ran_both_paths_with_the_same_ids_in_float32(report):
    cases = {(case["beams"], case["batch"]): case for case in report["cases"]}
    assert set(cases) == {(beams, batch) for beams in (1, 5) for batch in (1, 8, 32)}
    slots = report["engine"]["slots"]
    for (beams, batch), case in cases.items():
        engine, reference = case["engine"], case["reference"]
        assert engine["mode"] == "eager" and "compile_error" not in case and "reference_error" not in case
        # the real check: every sequence of the engine equals transformers' generate's, token for token
        assert case["ids"] == {"sequences": batch, "identical": batch, "share_identical": 1.0, "all_equal": True,
                               "lengths": [NEW_TOKENS + 1]}  # start token + exactly 20 new tokens
        per_wave = slots // beams  # samples decoding at once; a larger batch runs in waves of this many
        assert engine["steps"] == NEW_TOKENS * math.ceil(batch / per_wave)
        assert engine["bucket"] >= min(batch, per_wave) * beams
        assert engine["repeat_calls_same_ids"] is True
        for path in (engine, reference):
            assert path["images_per_s"] > 0 and path["latency_s"] > 0
            assert path["floor"]["floor_ms"] > 0 and path["floor"]["weight_bytes"] > 0
        assert engine["step_ms_median"] > 0 and engine["step_vs_floor"] > 0 and engine["model_step_ms"] > 0
        assert reference["step_ms"] is not None and reference["step_vs_floor"] is not None
        assert case["speedup_images_per_s"] > 0


def test_a_compile_failure_falls_back_to_the_eager_engine(tmp_path, monkeypatch, one_thread):
    script = load_script()

    def fails(self):
        raise RuntimeError("CUDA graph capture failed (simulated)")

    monkeypatch.setattr(DecodeEngine, "_compile", fails)
    output = tmp_path / "fallback.json"
    report = script.main(["--size", "tiny", "--device", "cpu", "--compile", "on", "--repeats", "1",
                          "--cases", "greedy:8,beams:1,greedy:1", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    first, second, third = report["cases"]
    for case in (first, second):
        assert "CUDA graph capture failed (simulated)" in case["compile_error"]["error"]
        assert case["engine"]["mode"] == "eager (fallback)" and case["ids"]["all_equal"]
    assert "compile_error" not in third and third["engine"]["mode"] == "eager (fallback)"
    assert any("not tried" in note for note in third["notes"])  # two failures: no third compile


def test_a_spent_budget_skips_the_remaining_cases(tmp_path, one_thread):
    output = tmp_path / "budget.json"
    report = load_script().main(["--size", "tiny", "--device", "cpu", "--budget-s", "0", "--output", str(output)])
    assert report["cases"] == [] and len(report["skipped"]) == 6
    assert all("budget" in skipped["why"] for skipped in report["skipped"])
    assert json.loads(output.read_text())["skipped"] == report["skipped"]
