"""Question answering benchmarks: VQAv2 / OK-VQA, GQA, A-OKVQA, generic VQA records, IconQA (its release's
folders of ``<pid>/data.json``, its ``problems.json``, or converted records), VSR and POPE."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from ..metrics_mmbench import OPTION_LETTERS
from .common import (
    AnnotationError,
    EvalSample,
    PathLike,
    _candidates,
    _check_unique,
    _format_options,
    _get,
    _path_list,
    _read_json,
    _where,
    read_records,
)


def _find_questions_file(ann_path: str) -> str | None:
    folder, name = os.path.split(ann_path)
    core = name.replace("_annotations", "_questions")
    cands = []
    if core.startswith("v2_"):
        cands.append("v2_OpenEnded_" + core[3:])
    cands.append("OpenEnded_" + core)
    cands.append(core)
    for c in cands:
        p = os.path.join(folder, c)
        if os.path.isfile(p) and p != ann_path:
            return p
    return None


def load_vqa_pair(annotation_path: PathLike | Sequence[PathLike], image_root: PathLike | None) -> list[EvalSample]:
    """VQAv2 / OK-VQA: the official questions + annotations JSON pair.

    ``annotation_path`` is the two files in any order, or only the annotations file
    (the questions file is then looked up beside it by the official naming,
    ``v2_mscoco_val2014_annotations.json`` -> ``v2_OpenEnded_mscoco_val2014_questions.json``).
    A single JSON/JSONL list of ``{question_id, image, question, answers}`` is also accepted.
    Images: ``COCO_<data_subtype>_<image_id:012d>.jpg`` under ``image_root`` (or its
    ``<data_subtype>/`` folder).
    """
    paths = _path_list(annotation_path)
    if len(paths) == 1:
        records = read_records(paths[0])
        if len(records) != 1 or not ({"annotations", "questions"} & records[0][1].keys()):
            return load_generic_vqa(paths[0], image_root)
        paths.append(_questions_beside(paths[0], records[0][1]))
    qfile, qdoc, afile, adoc = _vqa_documents(paths)
    subtype = adoc.get("data_subtype") or qdoc.get("data_subtype") or "val2014"
    anns = _vqa_answers(afile, adoc)
    samples = []
    for i, q in enumerate(qdoc["questions"]):
        where = _where(qfile, record=f"questions[{i}]")
        qid = str(_get(q, ("question_id",), where))
        image_id = _get(q, ("image_id",), where)
        question = _get(q, ("question",), where)
        if qid not in anns:
            raise AnnotationError(f"{where}: question_id {qid} has no entry in {afile}")
        try:
            name = f"COCO_{subtype}_{int(image_id):012d}.jpg"
        except (TypeError, ValueError):
            raise AnnotationError(f"{where}: image_id must be an integer, got {image_id!r}") from None
        a = anns[qid]
        samples.append(
            EvalSample(
                id=qid,
                image_candidates=_candidates(image_root, name, os.path.join(subtype, name)),
                fields={"question": str(question)},
                target=a["answers"],
                meta={"answer_type": a["answer_type"], "question_type": a["question_type"]},
            )
        )
    return _check_unique(samples, qfile)


def _questions_beside(annotations_path: str, doc: dict) -> str:
    """The questions file that belongs to an annotations file, by the official naming."""
    if "annotations" not in doc:
        raise AnnotationError(f"{annotations_path}: no 'annotations' (ground truth) in this file; pass the annotations JSON too")
    qpath = _find_questions_file(annotations_path)
    if qpath is None:
        raise AnnotationError(
            f"{annotations_path}: VQA annotations need their questions file; pass both "
            "(--ann QUESTIONS.json ANNOTATIONS.json)"
        )
    return qpath


def _vqa_documents(paths: list[str]) -> tuple[str, dict, str, dict]:
    """(questions file, its document, annotations file, its document) of the pair in `paths`."""
    if len(paths) != 2:
        raise AnnotationError(f"VQA needs a questions file and an annotations file, got {len(paths)} paths")
    docs = {p: _read_json(p) for p in paths}
    qfile = next((p for p, d in docs.items() if isinstance(d, dict) and "questions" in d), None)
    afile = next((p for p, d in docs.items() if isinstance(d, dict) and "annotations" in d), None)
    if qfile is None or afile is None or qfile == afile:
        raise AnnotationError(f"{paths}: expected one file with 'questions' and one with 'annotations'")
    return qfile, docs[qfile], afile, docs[afile]


def _vqa_answers(afile: str, adoc: dict) -> dict[str, dict[str, Any]]:
    """question id -> its ten answers, answer type and question type."""
    anns: dict[str, dict[str, Any]] = {}
    for i, ann in enumerate(adoc["annotations"]):
        where = _where(afile, record=f"annotations[{i}]")
        qid = str(_get(ann, ("question_id",), where))
        answers = _get(ann, ("answers",), where)
        if not isinstance(answers, list) or not answers:
            raise AnnotationError(f"{where}: 'answers' must be a non-empty list")
        try:
            texts = [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
        except KeyError:
            raise AnnotationError(f"{where}: every answer needs an 'answer' field") from None
        anns[qid] = {"answers": texts, "answer_type": ann.get("answer_type"), "question_type": ann.get("question_type")}
    return anns


def load_gqa(annotation_path: PathLike, image_root: PathLike | None) -> list[EvalSample]:
    """GQA ``testdev_balanced_questions.json``: ``{qid: {"imageId", "question", "answer"}}``.

    A list / JSON Lines of ``{"question_id", "image" | "imageId", "question", "answer"}``
    is accepted too. Images: ``<imageId>.jpg`` under ``image_root``.
    """
    path = os.fspath(annotation_path)
    items = read_records(path)
    if len(items) == 1 and "question" not in items[0][1]:
        data = items[0][1]
        bad = next((k for k, v in data.items() if not isinstance(v, dict)), None)
        if bad is not None:
            raise AnnotationError(f"{path} record {bad!r}: expected a JSON object per question id")
        items = [(_where(path, record=repr(k)), {**v, "question_id": v.get("question_id", k)}) for k, v in data.items()]
    samples = []
    for where, rec in items:
        qid = str(_get(rec, ("question_id", "id", "qid"), where))
        image_id = rec.get("imageId")
        image = rec.get("image") or (f"{image_id}.jpg" if image_id is not None else None)
        if image is None:
            raise AnnotationError(f"{where}: missing field 'imageId' / 'image'")
        samples.append(
            EvalSample(
                id=qid,
                image_candidates=_candidates(image_root, image, os.path.join("images", image)),
                fields={"question": str(_get(rec, ("question",), where))},
                target=str(_get(rec, ("answer",), where)),
            )
        )
    return _check_unique(samples, path)


def _difficult_flag(rec: dict, where: str) -> bool:
    value = rec.get("difficult_direct_answer", False)
    if not isinstance(value, bool):
        raise AnnotationError(f"{where}: 'difficult_direct_answer' must be true or false, got {value!r}")
    return value


def load_aokvqa(annotation_path: PathLike, image_root: PathLike | None) -> list[EvalSample]:
    """A-OKVQA ``aokvqa_v1p0_val.json``: list of ``{question_id, image_id, question,
    choices, correct_choice_idx, direct_answers}``. Images: COCO 2017
    ``<image_id:012d>.jpg`` under ``image_root`` or its ``val2017/`` / ``test2017/``.
    """
    samples = []
    for where, rec in read_records(annotation_path):
        qid = str(_get(rec, ("question_id",), where))
        choices = _get(rec, ("choices",), where)
        if not isinstance(choices, list) or not choices or len(choices) > len(OPTION_LETTERS):
            raise AnnotationError(f"{where}: 'choices' must be a non-empty list")
        if "image" in rec:
            names: tuple[str, ...] = (rec["image"],)
        else:
            iid = _get(rec, ("image_id",), where)
            try:
                base = f"{int(iid):012d}.jpg"
            except (TypeError, ValueError):
                raise AnnotationError(f"{where}: image_id must be an integer, got {iid!r}") from None
            names = (base, os.path.join("val2017", base), os.path.join("test2017", base), os.path.join("train2017", base))
        idx = rec.get("correct_choice_idx")
        if idx is not None and not (isinstance(idx, int) and 0 <= idx < len(choices)):
            raise AnnotationError(f"{where}: 'correct_choice_idx' {idx!r} out of range")
        letters = OPTION_LETTERS[: len(choices)]
        samples.append(
            EvalSample(
                id=qid,
                image_candidates=_candidates(image_root, *names),
                fields={
                    "question": str(_get(rec, ("question",), where)),
                    "options": _format_options(letters, choices),
                    "choices": ", ".join(str(c) for c in choices),
                },
                target={
                    "choices": [str(c) for c in choices],
                    "correct_choice_idx": idx,
                    "direct_answers": [str(d) for d in rec.get("direct_answers") or []],
                    "difficult_direct_answer": _difficult_flag(rec, where),
                },
            )
        )
    return _check_unique(samples, annotation_path)


def load_generic_vqa(annotation_path: PathLike, image_root: PathLike | None) -> list[EvalSample]:
    """Generic VQA records (IconQA, converted sets): JSON list or JSON Lines of
    ``{"question_id" | "id", "image", "question", "answer" | "answers", "choices"?}``.

    With ``choices``, ``answer`` may be the correct choice text or its 0-based index;
    the prediction is then mapped to a choice (letter, then text).
    """
    samples = []
    for n, (where, rec) in enumerate(read_records(annotation_path)):
        qid = str(rec.get("question_id", rec.get("id", rec.get("pid", n))))
        image = _get(rec, ("image", "image_path", "img_path", "file_name"), where)
        question = _get(rec, ("question", "text"), where)
        raw = _get(rec, ("answers", "answer", "label"), where)
        choices = rec.get("choices")
        fields = {"question": str(question), "options": "", "options_block": "", "choices": ""}
        answer_index = None
        if isinstance(raw, list):
            answers = [a["answer"] if isinstance(a, dict) else str(a) for a in raw]
        else:
            answers = [str(raw)]
        if choices is not None:
            if not isinstance(choices, list) or not choices or len(choices) > len(OPTION_LETTERS):
                raise AnnotationError(f"{where}: 'choices' must be a non-empty list of at most {len(OPTION_LETTERS)}")
            choices = [str(c) for c in choices]
            if isinstance(raw, int) and not isinstance(raw, bool):
                if not 0 <= raw < len(choices):
                    raise AnnotationError(f"{where}: answer index {raw} out of range")
                answer_index = raw
            elif answers[0] in choices:
                answer_index = choices.index(answers[0])
            else:
                raise AnnotationError(f"{where}: answer {answers[0]!r} is not one of the choices")
            letters = OPTION_LETTERS[: len(choices)]
            fields["options"] = _format_options(letters, choices)
            fields["options_block"] = "\nOptions:\n" + fields["options"]
            fields["choices"] = ", ".join(choices)
        samples.append(
            EvalSample(
                id=qid,
                image_candidates=_candidates(image_root, str(image)),
                fields=fields,
                target={"answers": answers, "choices": choices, "answer_index": answer_index},
                meta={"answer_type": rec.get("answer_type"), "question_type": rec.get("question_type")},
            )
        )
    return _check_unique(samples, annotation_path)


# IconQA question types a one-image model can answer; "choose_img" offers its choices as images.
ICONQA_QUESTION_TYPES = ("choose_txt", "fill_in_blank")


def _iconqa_sample(pid: str, rec: dict, where: str, image_candidates: tuple[str, ...]) -> EvalSample | None:
    """One IconQA problem (``data.json`` / ``problems.json`` record) as a sample; None for choose_img."""
    ques_type = _get(rec, ("ques_type",), where)
    if ques_type not in (*ICONQA_QUESTION_TYPES, "choose_img"):
        raise AnnotationError(f"{where}: unknown ques_type {ques_type!r}")
    if ques_type == "choose_img":
        return None
    question = str(_get(rec, ("question",), where))
    answer = _get(rec, ("answer",), where)
    fields = {"question": question, "options": "", "options_block": "", "choices": ""}
    if ques_type == "choose_txt":
        choices = _get(rec, ("choices",), where)
        if not isinstance(choices, list) or not choices or len(choices) > len(OPTION_LETTERS):
            raise AnnotationError(f"{where}: 'choices' must be a non-empty list of at most {len(OPTION_LETTERS)}")
        choices = [str(c) for c in choices]
        if isinstance(answer, str) and answer.isdigit():
            answer = int(answer)
        if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
            raise AnnotationError(f"{where}: choose_txt 'answer' must be the index of a choice, got {answer!r}")
        fields["options"] = _format_options(OPTION_LETTERS[: len(choices)], choices)
        fields["options_block"] = "\nOptions:\n" + fields["options"]
        fields["choices"] = ", ".join(choices)
        target = {"answers": [choices[answer]], "choices": choices, "answer_index": answer}
    else:
        target = {"answers": [str(answer)], "choices": None, "answer_index": None}
    return EvalSample(id=pid, image_candidates=image_candidates, fields=fields, target=target,
                      meta={"question_type": ques_type, "answer_type": ques_type})


def _iconqa_split_pids(problems_path: str, problems: dict, split: str) -> set[str]:
    """Ids of ``split``: from each problem's ``split`` field, else from ``pid_splits.json`` beside
    ``problems.json`` (keys ``<split>`` or ``<ques_type>_<split>``)."""
    if all("split" in rec for rec in problems.values()):
        return {str(pid) for pid, rec in problems.items() if rec["split"] == split}
    splits_path = os.path.join(os.path.dirname(problems_path), "pid_splits.json")
    if not os.path.isfile(splits_path):
        raise AnnotationError(f"{problems_path}: problems carry no 'split' field and there is no pid_splits.json "
                              "beside it to say which belong to which split")
    table = _read_json(splits_path)
    if not isinstance(table, dict):
        raise AnnotationError(f"{splits_path}: expected a JSON object of split name -> problem ids")
    return {str(pid) for key, pids in table.items() if key == split or key.endswith(f"_{split}") for pid in pids}


def load_iconqa(annotation_path: PathLike, image_root: PathLike | None, *, split: str = "test") -> list[EvalSample]:
    """IconQA as released (``iconqa_data/``), or converted JSON Lines (see `load_generic_vqa`).

    * a folder of the release, e.g. ``iconqa_data/iconqa/test`` or ``.../test/choose_txt``: every
      ``<pid>/data.json`` below it, with the image ``<pid>/image.png`` beside it;
    * ``iconqa_data/problems.json`` (``{pid: {question, choices?, answer, ques_type, split}}``):
      the problems of ``split``, images under ``image_root`` as ``iconqa/<split>/<ques_type>/<pid>/image.png``
      (or ``<split>/<ques_type>/<pid>/image.png``).

    ``choose_txt`` answers are choice indices, ``fill_in_blank`` answers strings; ``choose_img``
    problems (choices given as images) are left out, since the model sees one image.
    """
    path = os.fspath(annotation_path)
    if os.path.isdir(path):
        samples = [s for s in _iconqa_release_folder(path) if s is not None]
        if not samples:
            raise AnnotationError(f"{path}: no IconQA <pid>/data.json of types {ICONQA_QUESTION_TYPES} below this folder")
        return _check_unique(samples, path)
    records = read_records(path)
    problems = records[0][1] if len(records) == 1 else None
    if not (isinstance(problems, dict) and problems and all(isinstance(v, dict) and "ques_type" in v
                                                          for v in problems.values())):
        return load_generic_vqa(path, image_root)
    samples = [s for s in _iconqa_problems(path, problems, split, image_root) if s is not None]
    if not samples:
        raise AnnotationError(f"{path}: no problems of split {split!r} and types {ICONQA_QUESTION_TYPES}")
    return _check_unique(samples, path)


def _iconqa_release_folder(path: str) -> Iterator[EvalSample | None]:
    """A sample (None for choose_img) per ``<pid>/data.json`` below `path`, its image beside it."""
    for folder, _dirs, files in sorted(os.walk(path)):
        if "data.json" not in files:
            continue
        record_path = os.path.join(folder, "data.json")
        rec = _read_json(record_path)
        if not isinstance(rec, dict):
            raise AnnotationError(f"{record_path}: expected a JSON object")
        yield _iconqa_sample(os.path.basename(folder), rec, record_path, (os.path.join(folder, "image.png"),))


def _iconqa_problems(path: str, problems: dict, split: str, image_root: PathLike | None
                     ) -> Iterator[EvalSample | None]:
    """A sample (None for choose_img) per problem of `split` in ``problems.json``."""
    in_split = _iconqa_split_pids(path, problems, split)
    for pid, rec in problems.items():
        if str(pid) not in in_split:
            continue
        ques_type = str(rec.get("ques_type"))
        relative = os.path.join(split, ques_type, str(pid), "image.png")
        yield _iconqa_sample(str(pid), rec, _where(path, record=repr(pid)),
                             _candidates(image_root, os.path.join("iconqa", relative), relative,
                                         os.path.join(ques_type, str(pid), "image.png")))


def load_vsr(annotation_path: PathLike, image_root: PathLike | None) -> list[EvalSample]:
    """VSR JSON Lines (``data/splits/*/test.jsonl``): ``{"image", "caption", "label": 0|1}``.

    The caption is a statement; the target is "yes" (label 1, true) or "no".
    Images: COCO 2017 file names under ``image_root`` (or its train2017/val2017).
    """
    samples = []
    for n, (where, rec) in enumerate(read_records(annotation_path)):
        image = str(_get(rec, ("image", "img_path"), where))
        caption = str(_get(rec, ("caption", "statement"), where))
        label = _get(rec, ("label",), where)
        if label in (1, True, "1", "true", "True", "yes"):
            target = "yes"
        elif label in (0, False, "0", "false", "False", "no"):
            target = "no"
        else:
            raise AnnotationError(f"{where}: 'label' must be 0 or 1, got {label!r}")
        samples.append(
            EvalSample(
                id=str(rec.get("id", rec.get("question_id", n))),
                image_candidates=_candidates(
                    image_root, image, os.path.join("train2017", image), os.path.join("val2017", image)
                ),
                fields={"caption": caption, "question": caption, "relation": str(rec.get("relation", ""))},
                target=target,
                meta={"relation": rec.get("relation")},
            )
        )
    return _check_unique(samples, annotation_path)


def load_pope(annotation_path: PathLike, image_root: PathLike | None) -> list[EvalSample]:
    """POPE ``coco_pope_{random,popular,adversarial}.json`` (JSON Lines despite the name):
    ``{"question_id", "image", "text", "label": "yes"|"no"}``; images from COCO val2014.
    """
    samples = []
    for where, rec in read_records(annotation_path):
        label = str(_get(rec, ("label", "answer"), where)).strip().lower()
        if label not in ("yes", "no"):
            raise AnnotationError(f"{where}: 'label' must be 'yes' or 'no', got {label!r}")
        image = str(_get(rec, ("image",), where))
        samples.append(
            EvalSample(
                id=str(_get(rec, ("question_id", "id"), where)),
                image_candidates=_candidates(image_root, image, os.path.join("val2014", image)),
                fields={"question": str(_get(rec, ("text", "question"), where))},
                target=label,
            )
        )
    return _check_unique(samples, annotation_path)
