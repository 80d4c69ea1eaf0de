"""Loaders for the benchmarks' public annotation formats.

Every loader returns a list of `EvalSample` in file order. Loaders accept the common
variants of each format (field-name synonyms, JSON vs JSON Lines) but refuse malformed
records: an `AnnotationError` names the file and the line (JSON Lines / TSV) or the
record (JSON) and says which field is wrong.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .metrics_mmbench import OPTION_LETTERS, rotate_options, rotated_answer
from .metrics_rec import xywh_to_xyxy

__all__ = [
    "AnnotationError",
    "EvalSample",
    "load_captions",
    "load_vqa_pair",
    "load_gqa",
    "load_aokvqa",
    "load_generic_vqa",
    "load_iconqa",
    "load_vsr",
    "load_rec",
    "box_misfit",
    "BOX_FORMATS",
    "load_pope",
    "load_visdial",
    "load_mmbench",
    "read_records",
]

PathLike = str | os.PathLike


class AnnotationError(ValueError):
    """A malformed annotation file; the message starts with ``file:line`` or ``file record N``."""


@dataclass
class EvalSample:
    """One model query of a benchmark.

    Attributes:
        id: unique id within the task (used as the key of the predictions file).
        image_candidates: paths tried in order when loading the image.
        image_b64: base64-encoded image (MMBench TSV) used instead of a path.
        fields: values for the prompt template (``question``, ``expr``, ``options`` ...).
        target: ground truth in the task's scorer format.
        meta: extra information (question type, image size, rotation, group id ...).
    """

    id: str
    image_candidates: tuple[str, ...] = ()
    image_b64: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    target: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    def image_path(self) -> str:
        """First existing candidate path; raises FileNotFoundError listing all tried."""
        for cand in self.image_candidates:
            if os.path.isfile(cand):
                return cand
        raise FileNotFoundError(
            f"image for sample {self.id!r} not found; tried: {', '.join(self.image_candidates) or '(no path)'}"
        )

    def load_image(self):  # -> PIL.Image.Image
        """The image as RGB with its stored orientation (EXIF not applied, as the authors' code and the
        COCO tools read datasets); raises `lion_mllm.images.ImageLoadError` naming the sample."""
        from ..images import ImageLoadError, decode_image, load_image

        try:
            if self.image_b64 is not None:
                try:
                    data = base64.b64decode(self.image_b64)
                except (binascii.Error, ValueError):
                    raise ImageLoadError(f"sample {self.id!r}", "its base64 image is broken", "not_an_image") from None
                return decode_image(data, f"sample {self.id!r} (base64 image)", orientation="stored")
            return load_image(self.image_path(), orientation="stored")
        except FileNotFoundError as error:
            raise ImageLoadError(f"sample {self.id!r}", str(error), "not_found") from None

    def image_size(self) -> tuple[int, int]:
        """(width, height) of the original image, from the annotation when present."""
        w, h = self.meta.get("width"), self.meta.get("height")
        if w and h:
            return int(w), int(h)
        from PIL import Image

        if self.image_b64 is not None:
            with Image.open(io.BytesIO(base64.b64decode(self.image_b64))) as im:
                return im.size
        with Image.open(self.image_path()) as im:  # header only, cheap
            return im.size


# --------------------------------------------------------------------------- helpers


def _where(path: PathLike, line: int | None = None, record: Any = None) -> str:
    if line is not None:
        return f"{path}:{line}"
    if record is not None:
        return f"{path} record {record}"
    return str(path)


def _get(rec: dict, keys: Sequence[str], where: str, *, required: bool = True, default: Any = None) -> Any:
    for k in keys:
        if k in rec and rec[k] is not None:
            return rec[k]
    if required:
        accepted = " / ".join(repr(k) for k in keys)
        raise AnnotationError(f"{where}: missing field {accepted}")
    return default


def _iter_jsonl(path: PathLike) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AnnotationError(
                    f"{path}:{lineno}: malformed JSON line ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(rec, dict):
                raise AnnotationError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def _read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None


def read_records(path: PathLike) -> list[tuple[str, dict]]:
    """Read a JSON array/dict-of-records or a JSON Lines file as ``(where, record)`` pairs.

    ``where`` is ``file:line`` for JSON Lines and ``file record N`` for JSON, so that
    field errors raised later point at the offending record. Files named ``.json``
    that actually hold JSON Lines (POPE ships such files) are detected.
    """
    path = os.fspath(path)
    if not path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            # "Extra data" after a complete first object => JSON Lines.
            if not (exc.msg.startswith("Extra data") and lines and lines[0].lstrip().startswith("{")):
                raise AnnotationError(
                    f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
                ) from None
        else:
            if isinstance(data, list):
                out = []
                for i, rec in enumerate(data):
                    if not isinstance(rec, dict):
                        raise AnnotationError(f"{path} record {i}: expected a JSON object")
                    out.append((_where(path, record=i), rec))
                return out
            if isinstance(data, dict):
                return [(_where(path), data)]
            raise AnnotationError(f"{path}: expected a JSON array or object")
    return [(_where(path, line=ln), rec) for ln, rec in _iter_jsonl(path)]


def _candidates(root: PathLike | None, *names: str) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        if not name:
            continue
        if os.path.isabs(name) or root is None:
            out.append(os.fspath(name))
        else:
            out.append(os.path.join(os.fspath(root), name))
    return tuple(dict.fromkeys(out))  # dedupe, keep order


def _str_id(value: Any) -> str:
    return str(value)


def _check_unique(samples: list[EvalSample], path: PathLike) -> list[EvalSample]:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise AnnotationError(f"{path}: duplicate sample id {s.id!r}")
        seen.add(s.id)
    return samples


def _format_options(letters: Sequence[str], texts: Sequence[str]) -> str:
    return "\n".join(f"{l}. {t}" for l, t in zip(letters, texts))


# --------------------------------------------------------------------------- captions


def load_captions(annotation_path: PathLike, image_root: PathLike | None, *, split: str = "test") -> list[EvalSample]:
    """Caption benchmarks: COCO Karpathy, Flickr30K, TextCaps, NoCaps.

    Accepted layouts (detected from the content):
      * Karpathy ``dataset_coco.json`` / ``dataset_flickr30k.json``:
        ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}``;
        only images of ``split`` (default "test"; "restval" etc. also accepted).
      * LAVIS ``coco_karpathy_test.json`` / ``flickr30k test.json``: a list of
        ``{"image": "val2014/....jpg", "caption": [refs]}`` (``caption`` may be a string).
      * COCO caption format (NoCaps ``nocaps_val_4500_captions.json``, ``captions_val2014.json``):
        ``{"images": [{"id", "file_name", "domain"?}], "annotations": [{"image_id", "caption"}]}``;
        NoCaps' ``domain`` is kept for per-domain CIDEr.
      * TextCaps ``TextCaps_0.1_val.json``: ``{"data": [{"image_id", "image_path"?,
        "image_name"?, "caption_str"?, "reference_strs"?}]}``, grouped by ``image_id``.
    """
    records = read_records(annotation_path)
    data: Any = None
    if len(records) == 1 and ("images" in records[0][1] or "data" in records[0][1]):
        data = records[0][1]
    samples: list[EvalSample] = []
    if data is None:
        grouped: dict[str, EvalSample] = {}
        for where, rec in records:
            image = _get(rec, ("image", "file_name", "filename", "img_path"), where)
            caps = _get(rec, ("caption", "captions", "sentences", "refs"), where)
            caps = [caps] if isinstance(caps, str) else caps
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise AnnotationError(f"{where}: 'caption' must be a string or a list of strings")
            sid = _str_id(rec.get("image_id", image))
            if sid in grouped:  # LAVIS train-style: one caption per record
                grouped[sid].target.extend(caps)
                continue
            grouped[sid] = EvalSample(
                id=sid, image_candidates=_candidates(image_root, image, os.path.basename(image)), target=list(caps)
            )
        samples = list(grouped.values())
    elif (isinstance(data, dict) and isinstance(data.get("images"), list) and "annotations" not in data
          and data["images"] and isinstance(data["images"][0], dict) and "sentences" not in data["images"][0]
          and "id" in data["images"][0]):
        # COCO-style image info without captions (NoCaps nocaps_{val,test}_image_info.json): predictions
        # only, for the evaluation server.
        for i, img in enumerate(data["images"]):
            where = _where(annotation_path, record=f"images[{i}]")
            if not isinstance(img, dict):
                raise AnnotationError(f"{where}: expected a JSON object")
            iid = _str_id(_get(img, ("id",), where))
            fname = _get(img, ("file_name", "filename"), where)
            meta = {"group": img["domain"]} if "domain" in img else {}
            samples.append(EvalSample(id=iid, image_candidates=_candidates(image_root, fname), target=None, meta=meta))
    elif isinstance(data, dict) and "images" in data and "annotations" not in data:
        for i, img in enumerate(data["images"]):
            where = _where(annotation_path, record=f"images[{i}]")
            if not isinstance(img, dict):
                raise AnnotationError(f"{where}: expected a JSON object")
            if split and img.get("split", split) != split:
                continue
            filename = _get(img, ("filename", "file_name"), where)
            filepath = img.get("filepath", "")
            sents = _get(img, ("sentences",), where)
            refs = []
            for s in sents:
                if isinstance(s, dict) and isinstance(s.get("raw"), str):
                    refs.append(s["raw"])
                elif isinstance(s, str):
                    refs.append(s)
                else:
                    raise AnnotationError(f"{where}: each sentence needs a 'raw' string")
            sid = _str_id(img.get("cocoid", img.get("imgid", filename)))
            samples.append(
                EvalSample(
                    id=sid,
                    image_candidates=_candidates(image_root, os.path.join(filepath, filename), filename),
                    target=refs,
                )
            )
    elif isinstance(data, dict) and "annotations" in data and "images" in data:
        by_image: dict[str, EvalSample] = {}
        for i, img in enumerate(data["images"]):
            where = _where(annotation_path, record=f"images[{i}]")
            iid = _str_id(_get(img, ("id",), where))
            fname = _get(img, ("file_name", "filename"), where)
            meta = {"group": img["domain"]} if "domain" in img else {}
            if "width" in img and "height" in img:
                meta.update(width=img["width"], height=img["height"])
            by_image[iid] = EvalSample(id=iid, image_candidates=_candidates(image_root, fname), target=[], meta=meta)
        for i, ann in enumerate(data["annotations"]):
            where = _where(annotation_path, record=f"annotations[{i}]")
            iid = _str_id(_get(ann, ("image_id",), where))
            cap = _get(ann, ("caption",), where)
            if iid not in by_image:
                raise AnnotationError(f"{where}: image_id {iid} is not in 'images'")
            by_image[iid].target.append(str(cap))
        samples = [s for s in by_image.values() if s.target]
    elif isinstance(data, dict) and isinstance(data.get("data"), list):
        by_image = {}
        for i, rec in enumerate(data["data"]):
            where = _where(annotation_path, record=f"data[{i}]")
            iid = _str_id(_get(rec, ("image_id",), where))
            if iid not in by_image:
                path = rec.get("image_path") or ""
                name = rec.get("image_name") or iid
                by_image[iid] = EvalSample(
                    id=iid,
                    image_candidates=_candidates(image_root, path, os.path.basename(path), f"{name}.jpg"),
                    target=[],
                )
            refs = rec.get("reference_strs")
            if refs:
                # Every record of an image repeats the full reference list.
                if not by_image[iid].target:
                    by_image[iid].target.extend(str(r) for r in refs)
            elif rec.get("caption_str"):
                by_image[iid].target.append(str(rec["caption_str"]))
        if all(not s.target for s in by_image.values()):
            # TextCaps_0.1_test.json has no captions: predictions only, for the evaluation server.
            for sample in by_image.values():
                sample.target = None
            samples = list(by_image.values())
        else:
            samples = [s for s in by_image.values() if s.target]
    else:
        raise AnnotationError(f"{annotation_path}: unrecognised caption annotation format")
    if not samples:
        raise AnnotationError(f"{annotation_path}: no captions found (split={split!r})")
    return _check_unique(samples, annotation_path)


# --------------------------------------------------------------------------- VQA


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
    paths = [os.fspath(annotation_path)] if isinstance(annotation_path, (str, os.PathLike)) else [os.fspath(p) for p in annotation_path]
    if len(paths) == 1:
        records = read_records(paths[0])
        if len(records) != 1 or not ({"annotations", "questions"} & records[0][1].keys()):
            return load_generic_vqa(paths[0], image_root)
        if "annotations" in records[0][1]:
            qpath = _find_questions_file(paths[0])
            if qpath is None:
                raise AnnotationError(
                    f"{paths[0]}: VQA annotations need their questions file; pass both "
                    "(--ann QUESTIONS.json ANNOTATIONS.json)"
                )
            paths.append(qpath)
        else:
            raise AnnotationError(f"{paths[0]}: no 'annotations' (ground truth) in this file; pass the annotations JSON too")
    if len(paths) != 2:
        raise AnnotationError(f"VQA needs a questions file and an annotations file, got {len(paths)} paths")
    docs = {p: _read_json(p) for p in paths}
    qfile = next((p for p, d in docs.items() if isinstance(d, dict) and "questions" in d), None)
    afile = next((p for p, d in docs.items() if isinstance(d, dict) and "annotations" in d), None)
    if qfile is None or afile is None or qfile == afile:
        raise AnnotationError(f"{paths}: expected one file with 'questions' and one with 'annotations'")
    qdoc, adoc = docs[qfile], docs[afile]
    subtype = adoc.get("data_subtype") or qdoc.get("data_subtype") or "val2014"
    anns: dict[str, dict] = {}
    for i, ann in enumerate(adoc["annotations"]):
        where = _where(afile, record=f"annotations[{i}]")
        qid = _str_id(_get(ann, ("question_id",), where))
        answers = _get(ann, ("answers",), where)
        if not isinstance(answers, list) or not answers:
            raise AnnotationError(f"{where}: 'answers' must be a non-empty list")
        try:
            texts = [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
        except KeyError:
            raise AnnotationError(f"{where}: every answer needs an 'answer' field") from None
        anns[qid] = {"answers": texts, "answer_type": ann.get("answer_type"), "question_type": ann.get("question_type")}
    samples = []
    for i, q in enumerate(qdoc["questions"]):
        where = _where(qfile, record=f"questions[{i}]")
        qid = _str_id(_get(q, ("question_id",), where))
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
        qid = _str_id(_get(rec, ("question_id", "id", "qid"), where))
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
        qid = _str_id(_get(rec, ("question_id",), where))
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
        qid = _str_id(rec.get("question_id", rec.get("id", rec.get("pid", n))))
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
    samples: list[EvalSample] = []
    if os.path.isdir(path):
        for folder, _dirs, files in sorted(os.walk(path)):
            if "data.json" not in files:
                continue
            record_path = os.path.join(folder, "data.json")
            rec = _read_json(record_path)
            if not isinstance(rec, dict):
                raise AnnotationError(f"{record_path}: expected a JSON object")
            sample = _iconqa_sample(os.path.basename(folder), rec, record_path,
                                    (os.path.join(folder, "image.png"),))
            if sample is not None:
                samples.append(sample)
        if not samples:
            raise AnnotationError(f"{path}: no IconQA <pid>/data.json of types {ICONQA_QUESTION_TYPES} below this folder")
        return _check_unique(samples, path)
    records = read_records(path)
    problems = records[0][1] if len(records) == 1 else None
    if not (isinstance(problems, dict) and problems and all(isinstance(v, dict) and "ques_type" in v
                                                          for v in problems.values())):
        return load_generic_vqa(path, image_root)
    in_split = _iconqa_split_pids(path, problems, split)
    for pid, rec in problems.items():
        if str(pid) not in in_split:
            continue
        where = _where(path, record=repr(pid))
        ques_type = str(rec.get("ques_type"))
        relative = os.path.join(split, ques_type, str(pid), "image.png")
        sample = _iconqa_sample(str(pid), rec, where,
                                _candidates(image_root, os.path.join("iconqa", relative), relative,
                                            os.path.join(ques_type, str(pid), "image.png")))
        if sample is not None:
            samples.append(sample)
    if not samples:
        raise AnnotationError(f"{path}: no problems of split {split!r} and types {ICONQA_QUESTION_TYPES}")
    return _check_unique(samples, path)


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
                id=_str_id(rec.get("id", rec.get("question_id", n))),
                image_candidates=_candidates(
                    image_root, image, os.path.join("train2017", image), os.path.join("val2017", image)
                ),
                fields={"caption": caption, "question": caption, "relation": str(rec.get("relation", ""))},
                target=target,
                meta={"relation": rec.get("relation")},
            )
        )
    return _check_unique(samples, annotation_path)


# --------------------------------------------------------------------------- REC


BOX_FORMATS = ("xywh", "xyxy")
# COCO boxes are floats whose right/bottom edge can pass the image by a rounding error.
BOX_TOLERANCE_PX = 1.0
_FORMAT_HINT = {"xywh": "x,y,w,h (COCO)", "xyxy": "x0,y0,x1,y1 (Shikra REC_*.jsonl)"}


def box_as_xyxy(bbox: Sequence[float], box_format: str) -> tuple[float, float, float, float]:
    """A ground-truth box in ``box_format`` ("xywh" or "xyxy") as x0,y0,x1,y1 pixels."""
    return xywh_to_xyxy(bbox) if box_format == "xywh" else tuple(float(v) for v in bbox)  # type: ignore[return-value]


def box_misfit(bbox: Sequence[float], box_format: str, width: float | None, height: float | None) -> str | None:
    """Why ``bbox`` read as ``box_format`` cannot be a box of a ``width`` x ``height`` image, or None.

    Without a size only the box's own shape is checked (x1 >= x0 and y1 >= y0).
    """
    x0, y0, x1, y1 = box_as_xyxy(bbox, box_format)
    if x1 < x0 or y1 < y0:
        return "has negative size"
    if width is None or height is None:
        return None
    tol = BOX_TOLERANCE_PX
    if x0 < -tol or y0 < -tol:
        return f"starts before the image (x0={x0:g}, y0={y0:g})"
    if x1 > width + tol or y1 > height + tol:
        return f"ends at x1={x1:g}, y1={y1:g}, past the {width:g}x{height:g} image"
    return None


def _misfit_message(where: str, bbox: Any, fmt: str, why: str, width: Any, height: Any) -> str:
    other = "xyxy" if fmt == "xywh" else "xywh"
    size = (float(width), float(height)) if width and height else (None, None)
    if box_misfit(bbox, other, *size) is None:
        hint = f"it fits as {_FORMAT_HINT[other]}: pass --box-format {other} (box_format={other!r})"
    else:
        hint = f"it does not fit as {_FORMAT_HINT[other]} either: check the file's boxes and image sizes"
    return f"{where}: bbox {bbox!r} read as {_FORMAT_HINT[fmt]} {why}; {hint}"


def _detect_box_format(path: str, parsed: list[dict[str, Any]]) -> str:
    """The one box format under which every box of the file fits its image; else an error."""
    fits = {fmt: True for fmt in BOX_FORMATS}
    for item in parsed:
        if item["declared"] is not None:
            continue
        for fmt in BOX_FORMATS:
            if fits[fmt] and box_misfit(item["bbox"], fmt, item["width"], item["height"]) is not None:
                fits[fmt] = False
    fitting = [fmt for fmt in BOX_FORMATS if fits[fmt]]
    if len(fitting) == 1:
        return fitting[0]
    if not fitting:
        # Name the first line that fits neither, so the user can look at it.
        for item in parsed:
            if item["declared"] is None and all(
                    box_misfit(item["bbox"], fmt, item["width"], item["height"]) for fmt in BOX_FORMATS):
                why = box_misfit(item["bbox"], "xywh", item["width"], item["height"])
                raise AnnotationError(_misfit_message(item["where"], item["bbox"], "xywh", why,
                                                      item["width"], item["height"]))
        raise AnnotationError(
            f"{path}: some boxes fit only as x,y,w,h and others only as x0,y0,x1,y1; the file mixes formats "
            "(give such lines a 'bbox_format' field)"
        )
    raise AnnotationError(
        f"{path}: cannot tell the box format: every box fits both as {_FORMAT_HINT['xywh']} and as "
        f"{_FORMAT_HINT['xyxy']}; pass --box-format xywh or --box-format xyxy (box_format=...)"
    )


def load_rec(annotation_path: PathLike, image_root: PathLike | None, *, box_format: str = "auto") -> list[EvalSample]:
    """RefCOCO / RefCOCO+ / RefCOCOg JSON Lines (LAVIS / Shikra / MiniGPT-v2 style).

    Per line: image (``img_path`` | ``image`` | ``file_name``), expression
    (``expression`` | ``sentence`` | ``sent`` | ``sents`` (first if a list) | ``text``),
    ``bbox`` in pixels of the original image and, preferably, ``width``/``height``
    (else read from the image header when scoring).

    ``box_format``: ``"xywh"`` (COCO), ``"xyxy"`` (Shikra's ``REC_*.jsonl``) or ``"auto"``
    (default): the one format under which every box fits inside its image; a file whose boxes
    fit both ways is an error asking for the format, because reading x0,y0,x1,y1 boxes as
    x,y,w,h (or the reverse) would score silently wrong. A declared format is checked the same
    way: a box that runs past its image is an error saying which format fits. A line may
    declare its own format with ``bbox_format``. The format used is in each sample's
    ``meta["box_format"]`` (and ``meta["box_format_source"]``: "declared" or "detected").
    """
    if box_format not in (*BOX_FORMATS, "auto"):
        raise ValueError(f"box_format must be 'auto', 'xywh' or 'xyxy', got {box_format!r}")
    path = os.fspath(annotation_path)
    parsed: list[dict[str, Any]] = []
    for where, rec in read_records(path):
        line_id = where.rsplit(":", 1)[-1] if ":" in where else where.rsplit(" ", 1)[-1]
        image = str(_get(rec, ("img_path", "image", "file_name", "img"), where))
        expr = _get(rec, ("expression", "sentence", "sent", "sents", "text", "expr", "caption"), where)
        if isinstance(expr, list):
            if not expr:
                raise AnnotationError(f"{where}: empty expression list")
            expr = expr[0]
        bbox = _get(rec, ("bbox", "box", "gt_box"), where)
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise AnnotationError(f"{where}: 'bbox' must be a list of 4 numbers, got {bbox!r}")
        declared = rec.get("bbox_format")
        if declared is not None and declared not in BOX_FORMATS:
            raise AnnotationError(f"{where}: unknown bbox_format {declared!r} (use 'xywh' or 'xyxy')")
        width = _get(rec, ("width", "image_width", "img_w", "w"), where, required=False)
        height = _get(rec, ("height", "image_height", "img_h", "h"), where, required=False)
        for name, value in (("width", width), ("height", height)):
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise AnnotationError(f"{where}: '{name}' must be a positive number, got {value!r}")
        parsed.append({"where": where, "line_id": line_id, "rec": rec, "image": image, "expr": expr, "bbox": bbox,
                       "declared": declared, "width": width, "height": height})

    source = "declared"
    if box_format == "auto":
        if any(item["declared"] is None for item in parsed):
            box_format, source = _detect_box_format(path, parsed), "detected"
        else:
            box_format = "xywh"  # every line declares its own; unused
    samples = []
    for item in parsed:
        fmt = item["declared"] or box_format
        why = box_misfit(item["bbox"], fmt, item["width"], item["height"])
        if why is not None:
            raise AnnotationError(_misfit_message(item["where"], item["bbox"], fmt, why, item["width"], item["height"]))
        rec = item["rec"]
        sid = rec.get("id", rec.get("question_id", rec.get("sent_id")))
        samples.append(
            EvalSample(
                id=_str_id(sid) if sid is not None else f"line{item['line_id']}",
                image_candidates=_candidates(image_root, item["image"], os.path.basename(item["image"])),
                fields={"expr": str(item["expr"]).strip(), "question": str(item["expr"]).strip()},
                target=box_as_xyxy(item["bbox"], fmt),
                meta={"width": item["width"], "height": item["height"], "bbox": item["bbox"], "box_format": fmt,
                      "box_format_source": "line" if item["declared"] else source, "where": item["where"]},
            )
        )
    return _check_unique(samples, path)


# --------------------------------------------------------------------------- VisDial


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
        dense[(_str_id(_get(rec, ("image_id",), where)), round_id)] = [float(v) for v in relevance]
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
    paths = [os.fspath(annotation_path)] if isinstance(annotation_path, (str, os.PathLike)) \
        else [os.fspath(p) for p in annotation_path]
    if not 1 <= len(paths) <= 2:
        raise AnnotationError(f"VisDial takes the dialog file and optionally its dense annotations, got {len(paths)} files")
    docs = {p: _read_json(p) for p in paths}
    dialog_file = next((p for p, d in docs.items() if isinstance(d, dict) and "data" in d), None)
    if dialog_file is None:
        raise AnnotationError(f"{paths}: no VisDial dialog file (a JSON object with 'data') among them")
    dense_file = next((p for p in paths if p != dialog_file), None)
    dense = _visdial_dense(dense_file) if dense_file else {}
    doc = docs[dialog_file]
    data = doc["data"]
    where_doc = _where(dialog_file)
    for key in ("questions", "answers", "dialogs"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise AnnotationError(f"{where_doc}: 'data.{key}' must be a list")
    questions, answers = data["questions"], data["answers"]
    split = str(doc.get("split", "val2018"))

    def text(pool: list, index: Any, kind: str, where: str) -> str:
        if not isinstance(index, int) or not 0 <= index < len(pool):
            raise AnnotationError(f"{where}: {kind} index {index!r} is not in data.{kind}s (0..{len(pool) - 1})")
        return str(pool[index])

    samples: list[EvalSample] = []
    for d, dialog in enumerate(data["dialogs"]):
        where_dialog = _where(dialog_file, record=f"dialogs[{d}]")
        image_id = _get(dialog, ("image_id",), where_dialog)
        try:
            numeric_id = int(image_id)
        except (TypeError, ValueError):
            raise AnnotationError(f"{where_dialog}: image_id must be an integer, got {image_id!r}") from None
        names = [f"VisualDialog_{split}_{numeric_id:012d}.jpg", f"COCO_train2014_{numeric_id:012d}.jpg",
                 f"COCO_val2014_{numeric_id:012d}.jpg"]
        cands = _candidates(image_root, *names, *(os.path.join(f"VisualDialog_{split}", n) for n in names[:1]))
        history = [f"{str(_get(dialog, ('caption',), where_dialog)).strip().rstrip('.')}."]
        rounds = _get(dialog, ("dialog",), where_dialog)
        if not isinstance(rounds, list):
            raise AnnotationError(f"{where_dialog}: 'dialog' must be a list of rounds")
        for r, turn in enumerate(rounds, start=1):
            where = _where(dialog_file, record=f"dialogs[{d}].dialog[{r - 1}]")
            question = text(questions, _get(turn, ("question",), where), "question", where)
            options = turn.get("answer_options")
            if options is not None:
                if not isinstance(options, list) or not options:
                    raise AnnotationError(f"{where}: 'answer_options' must be a non-empty list of answer indices")
                candidates = [text(answers, o, "answer", where) for o in options]
                gt_index = turn.get("gt_index")
                if gt_index is not None and not (isinstance(gt_index, int) and 0 <= gt_index < len(candidates)):
                    raise AnnotationError(f"{where}: 'gt_index' {gt_index!r} is not an index of the {len(candidates)} options")
                relevance = dense.get((str(numeric_id), r))
                if relevance is not None and len(relevance) != len(candidates):
                    raise AnnotationError(f"{dense_file}: image {numeric_id} round {r} has {len(relevance)} relevance "
                                          f"values for {len(candidates)} answer options")
                samples.append(EvalSample(
                    id=f"{numeric_id}_{r}",
                    image_candidates=cands,
                    fields={"question": question.strip().rstrip("?") + "?", "caption": history[0],
                            "history": " ".join(history)},
                    target={"gt_index": gt_index, "relevance": relevance, "candidates": candidates},
                    meta={"image_id": numeric_id, "round_id": r},
                ))
            if "answer" in turn:
                answer = text(answers, turn["answer"], "answer", where)
                history.append(f"Q: {question.strip().rstrip('?')}? A: {answer.strip().rstrip('.')}.")
    if not samples:
        raise AnnotationError(f"{dialog_file}: no rounds with answer_options")
    return _check_unique(samples, dialog_file)


# --------------------------------------------------------------------------- POPE


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
                id=_str_id(_get(rec, ("question_id", "id"), where)),
                image_candidates=_candidates(image_root, image, os.path.join("val2014", image)),
                fields={"question": str(_get(rec, ("text", "question"), where))},
                target=label,
            )
        )
    return _check_unique(samples, annotation_path)


# --------------------------------------------------------------------------- MMBench


def _blank(value: str | None) -> bool:
    return value is None or value.strip() == "" or value.strip().lower() == "nan"


def load_mmbench(annotation_path: PathLike, image_root: PathLike | None) -> list[EvalSample]:
    """MMBench TSV (``MMBench_DEV_EN.tsv`` etc.) expanded into circular rotations.

    Columns: ``index, question, hint, A..D (E..), answer, category, l2-category`` and
    ``image`` (base64, or a row index referring to another row's image) or
    ``image_path`` (relative to ``image_root``). Legacy files that already contain the
    circular copies (index >= 1,000,000) are reduced to their base questions, which are
    then rotated here. Without an ``answer`` column the samples carry no target (test
    split: predictions only). Sample ids are ``<index>_r<rotation>``.
    """
    path = os.fspath(annotation_path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed the default
    rows: list[tuple[int, dict[str, str]]] = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise AnnotationError(f"{path}: empty TSV file") from None
        header = [h.strip() for h in header]
        for col in ("index", "question", "A", "B"):
            if col not in header:
                raise AnnotationError(f"{path}:1: missing column {col!r} in header {header}")
        try:
            for values in reader:
                if not values or all(not v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise AnnotationError(
                        f"{path}:{reader.line_num}: expected {len(header)} tab-separated fields, got {len(values)}"
                    )
                rows.append((reader.line_num, dict(zip(header, values))))
        except csv.Error as exc:
            raise AnnotationError(f"{path}:{reader.line_num}: malformed TSV ({exc})") from None

    images_by_index: dict[str, str] = {}
    base_rows: dict[int, tuple[int, dict[str, str]]] = {}
    for line, row in rows:
        try:
            index = int(float(row["index"]))
        except ValueError:
            raise AnnotationError(f"{path}:{line}: 'index' must be an integer, got {row['index']!r}") from None
        img = row.get("image")
        if img and not img.strip().isdigit():
            images_by_index[str(index)] = img
        base = index % 1_000_000
        if base not in base_rows or index < int(float(base_rows[base][1]["index"])):
            base_rows[base] = (line, row)

    samples = []
    for base, (line, row) in base_rows.items():
        where = f"{path}:{line}"
        letters = [l for l in OPTION_LETTERS if l in row and not _blank(row[l])]
        if len(letters) < 2 or letters != list(OPTION_LETTERS[: len(letters)]):
            raise AnnotationError(f"{where}: options must be consecutive letters from A with at least A and B")
        texts = [row[l].strip() for l in letters]
        answer = row.get("answer")
        answer_idx = None
        if not _blank(answer):
            answer = answer.strip()
            if answer not in letters:
                raise AnnotationError(f"{where}: answer {answer!r} is not one of the options {letters}")
            answer_idx = letters.index(answer)
        image_b64 = None
        cands: tuple[str, ...] = ()
        img = row.get("image")
        if img and img.strip():
            img = img.strip()
            image_b64 = images_by_index.get(img) if img.isdigit() else img
            if image_b64 is None:
                raise AnnotationError(f"{where}: image refers to row index {img} which has no image")
        elif row.get("image_path"):
            cands = _candidates(image_root, row["image_path"].strip())
        else:
            raise AnnotationError(f"{where}: no 'image' (base64) or 'image_path' column value")
        hint = "" if _blank(row.get("hint")) else row["hint"].strip()
        for r in range(len(letters)):
            shown = rotate_options(texts, r)
            samples.append(
                EvalSample(
                    id=f"{base}_r{r}",
                    image_candidates=cands,
                    image_b64=image_b64,
                    fields={
                        "question": row["question"].strip(),
                        "hint": hint,
                        "hint_block": f"{hint}\n" if hint else "",
                        "options": _format_options(letters, shown),
                    },
                    target=letters[rotated_answer(answer_idx, r, len(letters))] if answer_idx is not None else None,
                    meta={
                        "group_id": str(base),
                        "rotation": r,
                        "options": dict(zip(letters, shown)),
                        "category": None if _blank(row.get("category")) else row["category"].strip(),
                        "l2_category": None if _blank(row.get("l2-category")) else row["l2-category"].strip(),
                    },
                )
            )
    return samples

