"""Caption benchmarks: COCO Karpathy, Flickr30K, TextCaps, NoCaps."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from .common import AnnotationError, EvalSample, PathLike, _candidates, _check_unique, _get, _where, read_records


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
    if len(records) == 1 and ("images" in records[0][1] or "data" in records[0][1]):
        samples = _from_document(records[0][1], annotation_path, image_root, split)
    else:
        samples = _from_records(records, image_root)
    if not samples:
        raise AnnotationError(f"{annotation_path}: no captions found (split={split!r})")
    return _check_unique(samples, annotation_path)


def _from_document(data: dict[str, Any], path: PathLike, image_root: PathLike | None,
                   split: str) -> list[EvalSample]:
    """The samples of a one-document layout, told apart by its keys."""
    images = data.get("images")
    if "annotations" in data and "images" in data:
        return _coco_captions(data, path, image_root)
    if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" not in images[0] \
            and "id" in images[0]:
        return _image_info(images, path, image_root)
    if "images" in data:
        return _karpathy(images, path, image_root, split)
    if isinstance(data.get("data"), list):
        return _textcaps(data["data"], path, image_root)
    raise AnnotationError(f"{path}: unrecognised caption annotation format")


def _from_records(records: list[tuple[str, dict]], image_root: PathLike | None) -> list[EvalSample]:
    """LAVIS layout: one record per image with its captions, or (train style) one per caption."""
    grouped: dict[str, EvalSample] = {}
    for where, rec in records:
        image = _get(rec, ("image", "file_name", "filename", "img_path"), where)
        caps = _get(rec, ("caption", "captions", "sentences", "refs"), where)
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise AnnotationError(f"{where}: 'caption' must be a string or a list of strings")
        sid = str(rec.get("image_id", image))
        if sid in grouped:  # LAVIS train-style: one caption per record
            grouped[sid].target.extend(caps)
            continue
        grouped[sid] = EvalSample(
            id=sid, image_candidates=_candidates(image_root, image, os.path.basename(image)), target=list(caps)
        )
    return list(grouped.values())


def _image_info(images: list, path: PathLike, image_root: PathLike | None) -> list[EvalSample]:
    """COCO-style image info without captions (NoCaps nocaps_{val,test}_image_info.json): predictions only,
    for the evaluation server."""
    samples = []
    for where, img in _image_records(images, path):
        iid = str(_get(img, ("id",), where))
        fname = _get(img, ("file_name", "filename"), where)
        meta = {"group": img["domain"]} if "domain" in img else {}
        samples.append(EvalSample(id=iid, image_candidates=_candidates(image_root, fname), target=None, meta=meta))
    return samples


def _karpathy(images: Any, path: PathLike, image_root: PathLike | None, split: str) -> list[EvalSample]:
    samples = []
    for where, img in _image_records(images, path):
        if split and img.get("split", split) != split:
            continue
        filename = _get(img, ("filename", "file_name"), where)
        filepath = img.get("filepath", "")
        refs = []
        for s in _get(img, ("sentences",), where):
            if isinstance(s, dict) and isinstance(s.get("raw"), str):
                refs.append(s["raw"])
            elif isinstance(s, str):
                refs.append(s)
            else:
                raise AnnotationError(f"{where}: each sentence needs a 'raw' string")
        sid = str(img.get("cocoid", img.get("imgid", filename)))
        samples.append(EvalSample(
            id=sid, image_candidates=_candidates(image_root, os.path.join(filepath, filename), filename), target=refs,
        ))
    return samples


def _coco_captions(data: dict[str, Any], path: PathLike, image_root: PathLike | None) -> list[EvalSample]:
    by_image: dict[str, EvalSample] = {}
    for where, img in _image_records(data["images"], path):
        iid = str(_get(img, ("id",), where))
        fname = _get(img, ("file_name", "filename"), where)
        meta = {"group": img["domain"]} if "domain" in img else {}
        if "width" in img and "height" in img:
            meta.update(width=img["width"], height=img["height"])
        by_image[iid] = EvalSample(id=iid, image_candidates=_candidates(image_root, fname), target=[], meta=meta)
    for i, ann in enumerate(data["annotations"]):
        where = _where(path, record=f"annotations[{i}]")
        iid = str(_get(ann, ("image_id",), where))
        cap = _get(ann, ("caption",), where)
        if iid not in by_image:
            raise AnnotationError(f"{where}: image_id {iid} is not in 'images'")
        by_image[iid].target.append(str(cap))
    return [s for s in by_image.values() if s.target]


def _textcaps(records: list, path: PathLike, image_root: PathLike | None) -> list[EvalSample]:
    by_image: dict[str, EvalSample] = {}
    for i, rec in enumerate(records):
        where = _where(path, record=f"data[{i}]")
        iid = str(_get(rec, ("image_id",), where))
        if iid not in by_image:
            image_path = rec.get("image_path") or ""
            name = rec.get("image_name") or iid
            by_image[iid] = EvalSample(
                id=iid, target=[],
                image_candidates=_candidates(image_root, image_path, os.path.basename(image_path), f"{name}.jpg"),
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
        return list(by_image.values())
    return [s for s in by_image.values() if s.target]


def _image_records(images: Any, path: PathLike) -> Iterator[tuple[str, dict]]:
    """(where, record) of each entry of a COCO-style ``images`` list, each checked to be an object."""
    for i, img in enumerate(images):
        where = _where(path, record=f"images[{i}]")
        if not isinstance(img, dict):
            raise AnnotationError(f"{where}: expected a JSON object")
        yield where, img
