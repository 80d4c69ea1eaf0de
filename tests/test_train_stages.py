"""Stage-wise training on tiny models: the loss falls, only the stage's parameters move, the optimizer
groups and schedule are the authors', weights travel from stage to stage, exports load for inference."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math

import pytest
import torch
import yaml
from conftest import ASSETS
from PIL import Image

from lion_mllm import Lion, OfficialPaths
from lion_mllm.model.config import flant5xl
from lion_mllm.model.modeling_lion import LionModel
from lion_mllm.train import add_train_subcommand, run_train
from lion_mllm.train.config import load_train_config
from lion_mllm.train.data import read_annotations
from lion_mllm.train.loop import train
from lion_mllm.train.stages import (
    WarmupCosineSchedule,
    build_lion,
    configure_trainable,
    is_lion_parameter,
    load_into,
    map_between_stages,
    optimizer_param_groups,
    read_lion_checkpoint,
    unused_parameters,
)
from lion_mllm.train.synthetic import tiny_train_config, write_synthetic_dataset

T5, BERT = ASSETS / "flan-t5-tiny", ASSETS / "bert-tiny-uncased"
STAGE_FILES = {1: ["image_level"], 2: ["region_level"], 3: ["image_level", "region_level"],
               4: ["image_level", "region_level"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


def config(data, stage, out, model=None, **run):
    run = {"num_threads": 1, "init_lr": 2e-2, "min_lr": 2e-3, "max_steps": 20, "save_every_steps": 10, **run}
    cfg = tiny_train_config(data, stage, T5, BERT, out, **run)
    cfg["model"].update(model or {})
    return load_train_config(cfg)


def dataset_loss(lion: Lion, data, stage: int) -> float:
    records = [r for f in STAGE_FILES[stage] for r in read_annotations(data[f])[0]]
    batch = lion.processor([Image.open(data["vis_root"] / r.image) for r in records], [r.question for r in records],
                           [r.category for r in records], [r.tags for r in records],
                           answers=[r.answer for r in records])
    with torch.no_grad():
        return float(lion.model.eval()(**batch).loss)


def initial_lion(cfg) -> Lion:
    lion = build_lion(cfg.model, cfg.run.stage, torch.device("cpu"), torch.float32, seed=cfg.run.seed)
    for path in cfg.model.init_from:
        load_into(lion.model, path)
    return lion


@pytest.fixture(scope="module")
def stage_runs(data, tmp_path_factory):
    """Stages 1 and 2 from scratch, then stage 3 from both: {stage: (config, result)}."""
    out = tmp_path_factory.mktemp("runs")
    runs = {}
    for stage in (1, 2):
        cfg = config(data, stage, out / f"stage{stage}")
        runs[stage] = (cfg, train(cfg))
    # stage 3 from stage 1's last checkpoint and stage 2's exported bundle (both formats work)
    cfg = config(data, 3, out / "stage3", model={"init_from": [str(runs[1][1].last_checkpoint),
                                                               str(runs[2][1].export_dir)]})
    runs[3] = (cfg, train(cfg))
    return runs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loss_falls_and_only_the_stage_parameters_change(stage_runs, data, stage):
    cfg, result = stage_runs[stage]
    assert result.finished and result.step == 20
    before = initial_lion(cfg)
    after = Lion.from_pretrained(result.export_dir)
    loss_before, loss_after = dataset_loss(before, data, stage), dataset_loss(after, data, stage)
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
    expected_roads = {1: ("qformer.", "query_tokens", "qformer_projection.", "ln_vision."),
                      2: ("aggregator.", "aggregator_norm.", "aggregator_projection."),
                      3: ("qformer.", "query_tokens", "qformer_projection.", "ln_vision.", "aggregator.",
                          "aggregator_norm.", "aggregator_projection.")}[stage]
    trained = after.model.state_dict()
    changed = set()
    for name, value in before.model.state_dict().items():
        if not torch.equal(value, trained[name]):
            changed.add(name)
    lion_names = {n for n, _ in before.model.named_parameters() if is_lion_parameter(n)}
    dead = set(unused_parameters(before.model))
    assert len(dead) == (6 if stage != 2 else 0)
    assert changed == lion_names - dead  # every trainable tensor moved, nothing else did (ViT and T5 frozen)
    for name in lion_names:
        assert name.startswith(expected_roads) or ".adapter." in name or name == "tag_prompt_embedding", name
    assert any(".adapter.router_ratio" in n for n in changed) == (stage == 3)


def test_stage3_starts_from_stage1_and_stage2_in_the_mixture_slots(stage_runs):
    stage1 = read_lion_checkpoint(stage_runs[1][1].last_checkpoint)
    stage2 = read_lion_checkpoint(stage_runs[2][1].export_dir)
    assert (stage1[1], stage2[1]) == ("qformer", "aggregator")
    model = initial_lion(stage_runs[3][0]).model
    state = model.state_dict()
    adapter = "language_model.encoder.block.1.layer.1.adapter."
    assert torch.equal(state[adapter + "adapters.1.up_proj.weight"], stage1[0][adapter + "adapters.0.up_proj.weight"])
    assert torch.equal(state[adapter + "adapters.0.up_proj.weight"], stage2[0][adapter + "adapters.0.up_proj.weight"])
    assert torch.equal(state["qformer_projection.weight"], stage1[0]["qformer_projection.weight"])
    assert torch.equal(state["aggregator.blocks.0.output.dense.weight"],
                       stage2[0]["aggregator.blocks.0.output.dense.weight"])
    # routers start as the identity: region-level samples -> adapter 0 only, image-level -> adapter 1 only
    assert torch.equal(state[adapter + "router_ratio1"][:, 0], torch.tensor([1.0, 0.0]))
    assert torch.equal(state[adapter + "router_ratio2"][:, 0], torch.tensor([0.0, 1.0]))
    # the tag prompt comes from the later entry of init_from (stage 2 here)
    assert torch.equal(state["tag_prompt_embedding"], stage2[0]["tag_prompt_embedding"])
    assert map_between_stages(adapter + "adapters.1.scale", "all", "qformer") == adapter + "adapters.0.scale"
    assert map_between_stages(adapter + "adapters.0.scale", "all", "qformer") is None
    assert map_between_stages(adapter + "adapters.0.scale", "qformer", "aggregator") is None


def test_stage3_export_serves_inference_and_feeds_stage4(stage_runs, data, tmp_path):
    _, stage3 = stage_runs[3]
    lion = Lion.from_pretrained(stage3.export_dir)
    image = data["vis_root"] / "img000.png"
    answers = lion.generate([image, image], ["What colour is the square?", "Where is the red square?"],
                            ["caption", "grounding"], tags=["red, square"] * 2, num_beams=2, max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    exported = {k: v for k, v in lion.model.state_dict().items() if is_lion_parameter(k)}
    # stage 4 from the stage-3 checkpoint directory (init_from) and from the bundle (pretrained)
    for model in ({"init_from": [str(stage3.last_checkpoint)]}, {"pretrained": str(stage3.export_dir), "preset": None}):
        cfg = config(data, 4, tmp_path / "stage4", model=model, max_steps=3, init_lr=1e-3,
                     freeze=["qformer."])
        start = initial_lion(cfg).model.state_dict()
        for name, value in exported.items():
            assert torch.equal(start[name], value), name
        result = train(cfg)
        after = Lion.from_pretrained(result.export_dir).model.state_dict()
        assert all(torch.equal(after[n], exported[n]) for n in exported if n.startswith("qformer."))  # frozen
        assert not torch.equal(after["qformer_projection.weight"], exported["qformer_projection.weight"])


def test_stage4_from_the_authors_files_and_stage1_from_scratch(data, tmp_path):
    """The authors' formats: stage 4 from a released-style .pth (Lion.from_official), stage 1 from the
    ViT and FlanT5 files alone with LION's parts initialised as the authors' code does."""
    files = {"vit_model": str(ASSETS / "eva_vit_g_tiny.pth"), "llm_model": str(T5), "bert_model": str(BERT),
             "vit_num_heads": 2, "preset": None}
    released = config(data, 4, tmp_path / "s4", model={**files, "pretrained": str(ASSETS / "LION-FlanT5-tiny.pth")},
                      max_steps=2, batch_size_train=2, init_lr=1e-4)
    official = Lion.from_official(OfficialPaths(vit_model=ASSETS / "eva_vit_g_tiny.pth", llm_model=T5, bert_model=BERT,
                                                pretrained=ASSETS / "LION-FlanT5-tiny.pth"), vision_num_heads=2)
    result = train(released)
    trained = Lion.from_pretrained(result.export_dir).model.state_dict()
    dead = set(unused_parameters(official.model))
    for name, value in official.model.state_dict().items():
        moved = not torch.equal(trained[name], value)
        assert moved == (is_lion_parameter(name) and name not in dead), name
    scratch = config(data, 1, tmp_path / "s1", model=files, max_steps=2, batch_size_train=2)
    model = train(scratch)
    state = Lion.from_pretrained(model.export_dir).model.state_dict()
    assert state["vision_model.layers.0.mlp.fc1.weight"].shape[0] == official.config.vision.intermediate_size
    assert torch.equal(state["vision_model.layers.0.mlp.fc1.weight"],
                       official.model.state_dict()["vision_model.layers.0.mlp.fc1.weight"])


def test_optimizer_groups_are_the_authors_four():
    """FlanT5-XL on the meta device: the same tensors and parameter counts per group as the authors'
    `get_optimizer_params` (docs/authors-code.md), and the aggregator's groups carry boost_lr_scale."""
    with torch.device("meta"):
        model = LionModel(flant5xl())
    configure_trainable(model, include_unused=True)  # as the authors, who list the never-used tensors too
    groups = optimizer_param_groups(model, weight_decay=0.05, lr_scale=1.0, boost_lr_scale=3.0)
    summary = [(g["group"], len(g["params"]), sum(p.numel() for p in g["params"]), g["weight_decay"], g["lr_scale"])
               for g in groups]
    assert summary == [("main", 414, 232_067_328, 0.05, 1.0), ("main_no_decay", 502, 433_760, 0.0, 1.0),
                       ("aggregator", 20, 49_020_928, 0.05, 3.0), ("aggregator_no_decay", 32, 48_384, 0.0, 3.0)]
    assert sum(s[2] for s in summary) == 281_570_400  # the authors' trainable total
    configure_trainable(model)
    # ours leaves out the Q-Former's last text feed-forward (dense 768->3072->768 + LayerNorm): no gradient
    unused = 2 * 768 * 3072 + 3072 + 768 + 2 * 768
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 281_570_400 - unused


def test_schedule_warms_up_then_cosine_and_applies_each_group_scale():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr_scale": 1.0}, {"params": [params[1]], "lr_scale": 4.0}])
    schedule = WarmupCosineSchedule(optimizer, init_lr=1.0, min_lr=0.1, total_steps=10, warmup_steps=4, warmup_lr=0.0)
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in optimizer.param_groups])
        schedule.step()
    assert [round(s[0], 6) for s in seen[:4]] == [0.25, 0.5, 0.75, 1.0]
    assert seen[4][0] == 1.0  # the cosine starts at init_lr
    assert seen[5][0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1 / 6)))
    assert all(b == pytest.approx(4 * a) for a, b in seen)
    assert seen[-1][0] > 0.1 and schedule.lr_at(10) == pytest.approx(0.1)


def test_boost_lr_scale_reaches_the_aggregator(data, tmp_path):
    cfg = config(data, 2, tmp_path, max_steps=4, print_freq=1, boost_lr_scale=3.0, export_final=False,
                 tensorboard=True)
    result = train(cfg)
    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    assert (result.run_dir / "tensorboard").is_dir() == has_tensorboard  # optional: used when installed
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for record in records:
        assert record["lr_aggregator"] == pytest.approx(3 * record["lr_main"])
        assert record["lr_aggregator_no_decay"] == pytest.approx(3 * record["lr"])


def test_activation_checkpointing_trains_the_same(data, tmp_path):
    """Recomputing activations (T5 blocks, Q-Former layers, aggregator blocks; the adapters need their
    routes again in the backward pass) gives the same training, up to float summation order."""
    finals = []
    for checkpointing in (False, True):
        cfg = config(data, 3, tmp_path / str(checkpointing), max_steps=4, activation_checkpointing=checkpointing,
                     init_lr=5e-3, export_final=False)
        cfg.model.config_overrides = {"language": {"dropout_rate": 0.1}, "qformer": {"dropout": 0.1}}
        finals.append(read_lion_checkpoint(train(cfg).last_checkpoint)[0])
    start = {k: v for k, v in initial_lion(cfg).model.state_dict().items() if k in finals[0]}
    assert max(float((finals[0][k] - start[k]).abs().max()) for k in start) > 5e-3
    for name, value in finals[0].items():
        torch.testing.assert_close(finals[1][name], value, atol=1e-4, rtol=1e-4, msg=name)


def test_lion_cli_mounts_train(data, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="lion")
    add_train_subcommand(parser.add_subparsers(dest="command"))
    cfg_file = tmp_path / "stage2.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_train_config(data, 2, T5, BERT, tmp_path / "ignored", num_threads=1)))
    args = parser.parse_args(["train", "--config", str(cfg_file), "--set", "run.max_steps=2",
                              "--output-dir", str(tmp_path / "out")])
    assert args.func is run_train
    assert args.func(args) == 0
    run_dir = next((tmp_path / "out").iterdir())
    assert Lion.from_pretrained(run_dir / "final").config.visual_input == "aggregator"
    assert "finished at step 2/2" in capsys.readouterr().err
    bad = parser.parse_args(["train", "--config", str(cfg_file), "--set", "run.learning_rate=1"])
    assert bad.func(bad) == 2
    assert "config error" in capsys.readouterr().err


def test_unfreeze_trains_the_vit_and_t5_too_and_resumes_exactly(data, tmp_path):
    """`run.unfreeze` (models with nothing pretrained, e.g. lion-shapes): the named frozen-by-default parts
    train, are checkpointed and come back on resume; a prefix that names nothing is an error."""
    unfreeze = ["vision_model.", "language_model.lm_head."]
    cfg = config(data, 3, tmp_path / "full", max_steps=4, unfreeze=unfreeze, init_lr=5e-3, export_final=False)
    start = initial_lion(cfg).model.state_dict()
    full = train(cfg)
    params, _ = read_lion_checkpoint(full.last_checkpoint)
    assert any(k.startswith("vision_model.") for k in params) and "language_model.lm_head.weight" in params
    assert not any(k.startswith("language_model.encoder.block.0.layer.0.") for k in params)  # T5 blocks: frozen
    for prefix in ("vision_model.layers.0.mlp.fc1.weight", "language_model.lm_head.weight"):
        assert float((params[prefix] - start[prefix]).abs().max()) > 1e-4, prefix
    # stopped after 2 steps and resumed: the same parameters as the uninterrupted run
    stopped = train(config(data, 3, tmp_path / "resumed", max_steps=4, unfreeze=unfreeze, init_lr=5e-3,
                           export_final=False), stop_after_steps=2)
    resumed = train(config(data, 3, tmp_path / "resumed", max_steps=4, unfreeze=unfreeze, init_lr=5e-3,
                           export_final=False), resume=stopped.run_dir)
    for name, value in read_lion_checkpoint(resumed.last_checkpoint)[0].items():
        torch.testing.assert_close(value, params[name], atol=0, rtol=0, msg=name)
    with pytest.raises(ValueError, match="unfreeze"):
        train(config(data, 3, tmp_path / "typo", max_steps=1, unfreeze=["vit."]))


def test_fine_tuned_export_keeps_the_models_generation_config(stage_runs, data, tmp_path):
    """Decoding defaults and prompt templates travel from the bundle a run starts from to its export."""
    import shutil

    from lion_mllm.model.generation import GenerationDefaults

    _, stage3 = stage_runs[3]
    source = tmp_path / "source"
    shutil.copytree(stage3.export_dir, source)
    own = GenerationDefaults(num_beams=1, max_new_tokens=12, repetition_penalty=1.0)
    own = own.replace(prompts={**own.prompts, "vqa": "Question: {question} Short answer:"})
    own.save(source)
    cfg = config(data, 4, tmp_path / "stage4", model={"pretrained": str(source), "preset": None}, max_steps=1,
                 freeze=["qformer."])
    exported = Lion.from_pretrained(train(cfg).export_dir)
    assert exported.generation_config == own
