"""MMBench: a TSV of multiple-choice questions with embedded images, expanded into circular rotations."""

from __future__ import annotations

import csv
import os
import sys

from ..metrics_mmbench import OPTION_LETTERS, rotate_options, rotated_answer
from .common import AnnotationError, EvalSample, PathLike, _candidates, _format_options

Row = dict[str, str]


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
    rows = _read_tsv(path)
    images_by_index, base_rows = _base_questions(path, rows)
    samples = []
    for base, (line, row) in base_rows.items():
        samples += _rotations(f"{path}:{line}", base, row, images_by_index, image_root)
    return samples


def _read_tsv(path: str) -> list[tuple[int, Row]]:
    """The rows (with their line numbers) of a TSV whose header has at least index, question, A and B."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed the default
    rows: list[tuple[int, Row]] = []
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
    return rows


def _base_questions(path: str, rows: list[tuple[int, Row]]) -> tuple[dict[str, str], dict[int, tuple[int, Row]]]:
    """The base64 image of each row index (rows may refer to another row's image), and the row of each base
    question: legacy files repeat each question in circular copies at index + k * 1,000,000."""
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
    return images_by_index, base_rows


def _rotations(where: str, base: int, row: Row, images_by_index: dict[str, str],
               image_root: PathLike | None) -> list[EvalSample]:
    """One question as its circular rotations (option texts shifted, the answer letter with them)."""
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
    image_b64, cands = _image(where, row, images_by_index, image_root)
    hint = "" if _blank(row.get("hint")) else row["hint"].strip()
    samples = []
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


def _image(where: str, row: Row, images_by_index: dict[str, str], image_root: PathLike | None
           ) -> tuple[str | None, tuple[str, ...]]:
    """(base64 image, None) or (None, candidate paths) of a row."""
    img = row.get("image")
    if img and img.strip():
        img = img.strip()
        image_b64 = images_by_index.get(img) if img.isdigit() else img
        if image_b64 is None:
            raise AnnotationError(f"{where}: image refers to row index {img} which has no image")
        return image_b64, ()
    if row.get("image_path"):
        return None, _candidates(image_root, row["image_path"].strip())
    raise AnnotationError(f"{where}: no 'image' (base64) or 'image_path' column value")
