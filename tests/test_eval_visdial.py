"""VisDial v1.0: the retrieval metrics by hand, the loader, generative ranking, and the harness end to end."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from lion_mllm.evaluation import AnnotationError, evaluate
from lion_mllm.evaluation.datasets import load_visdial
from lion_mllm.evaluation.metrics_visdial import ndcg, ranks_from_scores, score_visdial


def test_ranks_from_scores_ties_keep_candidate_order():
    assert ranks_from_scores([0.1, 0.9, 0.5]) == [3, 1, 2]
    assert ranks_from_scores([1.0, 2.0, 1.0, 2.0]) == [3, 1, 4, 2]


def test_sparse_metrics_by_hand():
    # True answers ranked 1, 3, 1, 12 (scores: higher is better).
    def scores_ranking(gt_rank: int) -> list[float]:
        scores = [-float(i) for i in range(100)]  # candidate i has rank i + 1
        return scores, gt_rank - 1

    items = [(*scores_ranking(r), None) for r in (1, 3, 1, 12)]
    out = score_visdial(items)
    assert out["MRR"] == pytest.approx(100 * (1 + 1 / 3 + 1 + 1 / 12) / 4)
    assert (out["R@1"], out["R@5"], out["R@10"]) == (50.0, 75.0, 75.0)
    assert out["mean_rank"] == pytest.approx((1 + 3 + 1 + 12) / 4)
    assert out["NDCG"] is None and out["num_rounds"] == 4 and out["num_dense_rounds"] == 0


def test_ndcg_by_hand():
    # Predicted order: candidate 0, 1, 2, ... Relevance 1.0 on 0, 0.5 on 1 and on 9: K = 3.
    ranks = list(range(1, 11))
    relevance = [1.0, 0.5] + [0.0] * 7 + [0.5]
    # DCG@3 = 1/log2(2) + 0.5/log2(3) + 0/log2(4); ideal = 1 + 0.5/log2(3) + 0.5/log2(4).
    expected = (1 + 0.5 / math.log2(3)) / (1 + 0.5 / math.log2(3) + 0.5 / 2)
    assert ndcg(ranks, relevance) == pytest.approx(expected)
    assert ndcg(ranks, [0.0] * 9 + [1.0]) == 0.0  # K = 1: the top candidate is irrelevant
    assert ndcg(ranks[::-1], [0.0] * 9 + [1.0]) == 1.0
    with pytest.raises(ValueError, match="no relevant candidate"):
        ndcg(ranks, [0.0] * 10)


# --------------------------------------------------------------------------- files


ANSWERS = [f"answer {i}" for i in range(100)]


def _visdial_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two dialogs of two rounds; option lists are shuffled answer pools, true answers chosen so
    that a scorer preferring higher numbers ranks them 1, 3, 1 and 12."""
    root = tmp_path / "images"
    for image_id, colour in ((11, (200, 20, 20)), (22, (20, 20, 200))):
        (root / "VisualDialog_val2018").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12), colour).save(root / "VisualDialog_val2018" / f"VisualDialog_val2018_{image_id:012d}.jpg")
    rng = random.Random(0)
    questions = ["what colour is it", "is it square", "how many", "is it day"]

    def options_with(true_text: str) -> tuple[list[int], int]:
        order = list(range(100))
        rng.shuffle(order)
        return order, order.index(ANSWERS.index(true_text))

    dialogs = []
    for image_id, truths in ((11, ("answer 99", "answer 97")), (22, ("answer 99", "answer 88"))):
        rounds = []
        for r, truth in enumerate(truths):
            options, gt = options_with(truth)
            rounds.append({"question": r + (0 if image_id == 11 else 2), "answer": ANSWERS.index(truth),
                           "answer_options": options, "gt_index": gt})
        dialogs.append({"image_id": image_id, "caption": f"a plain picture {image_id}", "dialog": rounds})
    ann = tmp_path / "visdial_1.0_val.json"
    ann.write_text(json.dumps({"version": "1.0", "split": "val2018",
                               "data": {"questions": questions, "answers": ANSWERS, "dialogs": dialogs}}))
    # Dense relevance for round 1 of image 11 and round 2 of image 22, by option position.
    dense = []
    for dialog, round_id, relevant in ((dialogs[0], 1, {"answer 99": 1.0, "answer 98": 0.5, "answer 0": 0.5}),
                                       (dialogs[1], 2, {"answer 88": 1.0})):
        options = dialog["dialog"][round_id - 1]["answer_options"]
        dense.append({"image_id": dialog["image_id"], "round_id": round_id,
                      "gt_relevance": [relevant.get(ANSWERS[o], 0.0) for o in options]})
    dense_path = tmp_path / "visdial_1.0_val_dense_annotations.json"
    dense_path.write_text(json.dumps(dense))
    return ann, dense_path, root


class NumberScorer:
    """score_fn: prefers candidates with higher numbers; checks images and prompts arrive."""

    def __init__(self):
        self.prompts: list[str] = []

    def __call__(self, images, prompts, candidates, tasks):
        assert len(images) == len(prompts) == len(candidates) == len(tasks)
        assert all(isinstance(im, Image.Image) and im.size == (16, 12) for im in images)
        assert set(tasks) == {"vqa"}
        self.prompts += prompts
        return [[float(c.split()[-1]) for c in cands] for cands in candidates]


def test_loader_rounds_history_and_errors(tmp_path):
    ann, dense, root = _visdial_files(tmp_path)
    samples = load_visdial([dense, ann], root)
    assert [s.id for s in samples] == ["11_1", "11_2", "22_1", "22_2"]
    second = samples[1]
    assert second.fields["history"] == "a plain picture 11. Q: what colour is it? A: answer 99."
    assert second.fields["question"] == "is it square?"
    assert len(second.target["candidates"]) == 100 and second.target["relevance"] is None
    assert samples[0].target["relevance"] is not None and samples[0].image_path().endswith("VisualDialog_val2018_000000000011.jpg")
    doc = json.loads(ann.read_text())
    doc["data"]["dialogs"][1]["dialog"][0]["gt_index"] = 100
    ann.write_text(json.dumps(doc))
    with pytest.raises(AnnotationError, match=re.escape(f"{ann} record dialogs[1].dialog[0]") + ".*'gt_index' 100"):
        load_visdial(ann, root)
    doc["data"]["dialogs"][1]["dialog"][0]["answer_options"][5] = 1000
    ann.write_text(json.dumps(doc))
    with pytest.raises(AnnotationError, match=r"answer index 1000 is not in data.answers \(0..99\)"):
        load_visdial(ann, root)


def test_visdial_end_to_end_through_the_harness(tmp_path):
    ann, dense, root = _visdial_files(tmp_path)
    scorer = NumberScorer()
    out = tmp_path / "out"
    report = evaluate("visdial", None, [ann, dense], root, score_fn=scorer, out_dir=out, batch_size=3)
    m = report["metrics"]
    # True answers 99, 97, 99, 88 -> ranks 1, 3, 1, 12.
    assert m["MRR"] == pytest.approx(100 * (1 + 1 / 3 + 1 + 1 / 12) / 4)
    assert (m["R@1"], m["R@5"], m["R@10"], m["mean_rank"]) == (50.0, 75.0, 75.0, 4.25)
    # Dense rounds: 11_1 as test_ndcg_by_hand's first case; 22_2: K = 1, top candidate irrelevant -> 0.
    first = (1 + 0.5 / math.log2(3)) / (1 + 0.5 / math.log2(3) + 0.5 / 2)
    assert m["NDCG"] == pytest.approx(100 * (first + 0.0) / 2)
    assert report["primary_metric"] == "MRR" and "VisDial" in report["markdown"]
    assert scorer.prompts[1] == ("Dialog history: a plain picture 11. Q: what colour is it? A: answer 99.\n"
                                 "Question: is it square? Short answer:")
    # The predictions file keeps every candidate's score; re-scoring needs no model.
    lines = [json.loads(x) for x in (out / "visdial.predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and lines[0]["prediction"] == "answer 99" and len(lines[0]["scores"]) == 100
    again = evaluate("visdial", None, [ann, dense], root, out_dir=out)
    assert again["num_generated"] == 0 and again["metrics"] == m
    # Without the dense file: no NDCG, said in the notes.
    sparse = evaluate("visdial", None, ann, root, score_fn=NumberScorer())
    assert sparse["metrics"]["NDCG"] is None and any("NDCG not computed" in n for n in sparse["notes"])
    with pytest.raises(ValueError, match="ranks candidate answers: pass score_fn"):
        evaluate("visdial", None, ann, root)


def test_generative_ranking_with_lion_shapes(tmp_path):
    """Real model, real likelihoods: the shapes model ranks the true answer of two held-out scenes first."""
    import torch

    from lion_mllm import load_model, shapes
    from lion_mllm.evaluation.likelihood import candidate_log_likelihoods

    lion = load_model("lion-shapes")
    items = shapes.held_out_items(2, shapes.HELD_OUT_SEED_BASE)
    prompts = [shapes.PROMPTS["vqa"].format(question=it["question"]) for it in items]
    candidates = [[it["answer"], "seven", "a large red circle", "yes", "no"] for it in items]
    scores = candidate_log_likelihoods(lion, [it["image"] for it in items], prompts, candidates, ["vqa"] * 2,
                                       chunk_size=3)
    # Each score is the model's own teacher-forced log-likelihood: -(mean token loss) x tokens.
    tags = lion.tag([it["image"] for it in items])
    for q, it in enumerate(items):
        for c, text in enumerate(candidates[q]):
            batch = lion.processor([it["image"]], [prompts[q]], ["vqa"], [tags[q]], answers=[text],
                                   truncate_prompt=False)
            with torch.no_grad():
                loss = lion.model(**batch).loss.item()
            assert scores[q][c] == pytest.approx(-loss * int((batch["labels"] != -100).sum()), abs=1e-3)
        assert ranks_from_scores(scores[q])[0] == 1  # the true answer first
