"""Visual Dialog v1.0: one sample per round with answer options, ranked by the model's likelihood."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .common import (
    AnnotationError,
    EvalSample,
    PathLike,
    _candidates,
    _check_unique,
    _get,
    _path_list,
    _read_json,
    _where,
)


def _visdial_dense(path: str) -> dict[tuple[str, int], list[float]]:
    """``visdial_1.0_val_dense_annotations.json``: (image_id, round_id 1-based) -> relevance of the 100 candidates."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: dense annotations must be a JSON list of {{image_id, round_id, gt_relevance}}")
    dense: dict[tuple[str, int], list[float]] = {}
    for i, rec in enumerate(data):
        where = _where(path, record=i)
        if not isinstance(rec, dict):
            raise AnnotationError(f"{where}: expected a JSON object")
        relevance = _get(rec, ("gt_relevance", "relevance"), where)
        round_id = _get(rec, ("round_id",), where)
        if not (isinstance(relevance, list) and all(isinstance(v, (int, float)) for v in relevance)):
            raise AnnotationError(f"{where}: 'gt_relevance' must be a list of numbers")
        if not isinstance(round_id, int) or round_id < 1:
            raise AnnotationError(f"{where}: 'round_id' must be a 1-based integer, got {round_id!r}")
        dense[(str(_get(rec, ("image_id",), where)), round_id)] = [float(v) for v in relevance]
    return dense


def load_visdial(annotation_path: PathLike | Sequence[PathLike], image_root: PathLike | None) -> list[EvalSample]:
    """Visual Dialog v1.0 (``visdial_1.0_val.json`` / ``visdial_1.0_test.json``), optionally with
    ``visdial_1.0_val_dense_annotations.json`` (any order).

    The dialog file is ``{"split", "data": {"questions": [...], "answers": [...], "dialogs":
    [{"image_id", "caption", "dialog": [{"question", "answer"?, "answer_options", "gt_index"?}]}]}}``
    with indices into the question and answer lists. One sample per round that has
    ``answer_options`` (val: all ten; test: the last, unanswered one), id
    ``<image_id>_<round>`` (round 1-based, as the dense annotations and EvalAI count). The history
    is the caption and the previous rounds' questions and answers. Images:
    ``VisualDialog_<split>_<image_id:012d>.jpg`` under ``image_root`` or its
    ``VisualDialog_<split>/`` folder (train: COCO names).
    """
    paths = _path_list(annotation_path)
    if not 1 <= len(paths) <= 2:
        raise AnnotationError(f"VisDial takes the dialog file and optionally its dense annotations, got {len(paths)} files")
    docs = {p: _read_json(p) for p in paths}
    dialog_file = next((p for p, d in docs.items() if isinstance(d, dict) and "data" in d), None)
    if dialog_file is None:
        raise AnnotationError(f"{paths}: no VisDial dialog file (a JSON object with 'data') among them")
    dense_file = next((p for p in paths if p != dialog_file), None)
    dialogs = _Dialogs(dialog_file, docs[dialog_file], dense_file, image_root)
    samples = [s for d, dialog in enumerate(dialogs.data["dialogs"]) for s in dialogs.rounds(d, dialog)]
    if not samples:
        raise AnnotationError(f"{dialog_file}: no rounds with answer_options")
    return _check_unique(samples, dialog_file)


class _Dialogs:
    """A dialog file's shared pools of questions and answers, its split and the dense relevance scores."""

    def __init__(self, path: str, doc: Any, dense_file: str | None, image_root: PathLike | None):
        self.path, self.dense_file, self.image_root = path, dense_file, image_root
        self.dense = _visdial_dense(dense_file) if dense_file else {}
        self.data = doc["data"]
        for key in ("questions", "answers", "dialogs"):
            if not isinstance(self.data.get(key) if isinstance(self.data, dict) else None, list):
                raise AnnotationError(f"{_where(path)}: 'data.{key}' must be a list")
        self.split = str(doc.get("split", "val2018"))

    def text(self, kind: str, index: Any, where: str) -> str:
        """The question or answer (`kind`) at `index` of its pool."""
        pool = self.data[f"{kind}s"]
        if not isinstance(index, int) or not 0 <= index < len(pool):
            raise AnnotationError(f"{where}: {kind} index {index!r} is not in data.{kind}s (0..{len(pool) - 1})")
        return str(pool[index])

    def rounds(self, d: int, dialog: dict) -> list[EvalSample]:
        """The samples of dialog `d`: its rounds with answer options, each with the history before it."""
        where_dialog = _where(self.path, record=f"dialogs[{d}]")
        image_id = _get(dialog, ("image_id",), where_dialog)
        try:
            numeric_id = int(image_id)
        except (TypeError, ValueError):
            raise AnnotationError(f"{where_dialog}: image_id must be an integer, got {image_id!r}") from None
        names = [f"VisualDialog_{self.split}_{numeric_id:012d}.jpg", f"COCO_train2014_{numeric_id:012d}.jpg",
                 f"COCO_val2014_{numeric_id:012d}.jpg"]
        cands = _candidates(self.image_root, *names, os.path.join(f"VisualDialog_{self.split}", names[0]))
        history = [f"{str(_get(dialog, ('caption',), where_dialog)).strip().rstrip('.')}."]
        turns = _get(dialog, ("dialog",), where_dialog)
        if not isinstance(turns, list):
            raise AnnotationError(f"{where_dialog}: 'dialog' must be a list of rounds")
        samples = []
        for r, turn in enumerate(turns, start=1):
            where = _where(self.path, record=f"dialogs[{d}].dialog[{r - 1}]")
            question = self.text("question", _get(turn, ("question",), where), where)
            if turn.get("answer_options") is not None:
                samples.append(self._round(turn, where, numeric_id, r, question, history, cands))
            if "answer" in turn:
                answer = self.text("answer", turn["answer"], where)
                history.append(f"Q: {question.strip().rstrip('?')}? A: {answer.strip().rstrip('.')}.")
        return samples

    def _round(self, turn: dict, where: str, image_id: int, r: int, question: str, history: list[str],
               cands: tuple[str, ...]) -> EvalSample:
        options = turn["answer_options"]
        if not isinstance(options, list) or not options:
            raise AnnotationError(f"{where}: 'answer_options' must be a non-empty list of answer indices")
        candidates = [self.text("answer", o, where) for o in options]
        gt_index = turn.get("gt_index")
        if gt_index is not None and not (isinstance(gt_index, int) and 0 <= gt_index < len(candidates)):
            raise AnnotationError(f"{where}: 'gt_index' {gt_index!r} is not an index of the {len(candidates)} options")
        relevance = self.dense.get((str(image_id), r))
        if relevance is not None and len(relevance) != len(candidates):
            raise AnnotationError(f"{self.dense_file}: image {image_id} round {r} has {len(relevance)} relevance "
                                  f"values for {len(candidates)} answer options")
        return EvalSample(
            id=f"{image_id}_{r}",
            image_candidates=cands,
            fields={"question": question.strip().rstrip("?") + "?", "caption": history[0],
                    "history": " ".join(history)},
            target={"gt_index": gt_index, "relevance": relevance, "candidates": candidates},
            meta={"image_id": image_id, "round_id": r},
        )
