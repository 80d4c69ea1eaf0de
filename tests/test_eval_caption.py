"""Caption metrics go through pycocoevalcap exactly as its own scorers do."""

from __future__ import annotations

import pytest
from skip_policy import needs_java

from lion_mllm.evaluation import metrics_caption
from lion_mllm.evaluation.metrics_caption import JavaNotFoundError, score_captions

GTS = {
    "1": ["A man riding a horse on a beach.", "A person rides a brown horse near the sea.", "Man on horseback."],
    "2": ["Two dogs play in the grass!", "Dogs running on a green lawn.", "A pair of dogs playing outside."],
    "3": ["A red bus parked on the street.", "A double-decker bus, parked.", "The bus is red."],
}
RES = {"1": "A man rides a horse on the beach.", "2": "two dogs playing on grass", "3": "a red bus on a street"}


@needs_java
def test_caption_metrics_equal_pycocoevalcap_direct_calls():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours = score_captions(GTS, RES, spice=False)

    # What COCOEvalCap.evaluate() does: tokenise gts and res separately, then score.
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in GTS.items()})
    res = tok.tokenize({k: [{"caption": RES[k]}] for k in GTS})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    # The project keeps one METEOR JVM per process (start-up takes seconds); it must
    # be pycocoevalcap's own Meteor, and its compute_score is called here directly.
    scorer = metrics_caption.meteor_scorer()
    assert type(scorer) is Meteor
    meteor, _ = scorer.compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)

    for n in range(4):
        assert ours[f"Bleu_{n + 1}"] == pytest.approx(bleu[n], rel=0, abs=1e-12)
    assert ours["METEOR"] == pytest.approx(meteor, abs=1e-12)
    assert ours["ROUGE_L"] == pytest.approx(rouge, abs=1e-12)
    assert ours["CIDEr"] == pytest.approx(cider, abs=1e-12)
    # Sanity: the scores are not trivially 0 or 1.
    assert 0.0 < ours["Bleu_4"] < 1.0 and 0.0 < ours["CIDEr"]
    assert set(ours["per_image"]) == set(GTS)
    if not metrics_caption.spice_available():
        assert any("SPICE skipped" in n for n in ours["notes"])
        assert "SPICE" not in ours


def test_missing_java_gives_clear_error(monkeypatch, tmp_path):
    # An empty PATH: shutil.which("java") finds nothing.
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(JavaNotFoundError, match=r"Java.*PATH.*install", ) as info:
        score_captions(GTS, RES, spice=False)
    assert "java -version" in str(info.value)


def test_missing_java_via_which(monkeypatch):
    monkeypatch.setattr(metrics_caption.shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(JavaNotFoundError):
        metrics_caption.check_java()


def test_inputs_are_validated():
    with pytest.raises(KeyError, match="no generated caption"):
        score_captions(GTS, {"1": "x"}, spice=False)
    with pytest.raises(ValueError):
        score_captions({}, {}, spice=False)


@needs_java
def test_spice_demanded_but_missing(monkeypatch):
    monkeypatch.setattr(metrics_caption, "spice_available", lambda: False)
    monkeypatch.setattr(metrics_caption, "_tokenize", lambda g, r: ({k: ["a b"] for k in g}, {k: ["a b"] for k in g}))

    class _NoMeteor:  # avoid starting METEOR's JVM for this check
        def compute_score(self, g, r):
            return 0.5, []

    monkeypatch.setattr(metrics_caption, "meteor_scorer", lambda: _NoMeteor())
    with pytest.raises(RuntimeError, match="SPICE requested"):
        score_captions({"1": ["a b"]}, {"1": "a b"}, spice=True)


def test_harness_checks_java_before_generating(monkeypatch, tmp_path):
    from lion_mllm.evaluation import evaluate

    ann = tmp_path / "coco_karpathy_test.json"
    ann.write_text('[{"image": "val2014/a.jpg", "caption": ["a cat"]}]')
    monkeypatch.setenv("PATH", str(tmp_path))

    def generate(images, questions, tasks):
        raise AssertionError("the model must not run when the metrics cannot")

    with pytest.raises(JavaNotFoundError):
        evaluate("coco_caption", generate, ann, tmp_path)
