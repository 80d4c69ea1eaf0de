"""Caption metrics through pycocoevalcap (the library the COCO caption server uses).

Captions are tokenised with pycocoevalcap's Java PTB tokenizer, then scored by its
BLEU-1..4, METEOR (Java), ROUGE-L and CIDEr(-D) implementations, the same calls that
``pycocoevalcap.eval.COCOEvalCap`` makes. SPICE needs the Stanford CoreNLP jars that
pycocoevalcap downloads at first use; offline they are absent, so SPICE is skipped with
a note unless explicitly demanded.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "JavaNotFoundError",
    "check_java",
    "spice_available",
    "score_captions",
    "cider_per_group",
    "meteor_scorer",
    "close_meteor",
]

_JAVA_HELP = (
    "Caption metrics need Java: pycocoevalcap's PTB tokenizer, METEOR and SPICE run "
    "`java` (Java 8 or newer) as a subprocess, and no `java` executable was found on "
    "PATH. Install a JRE (e.g. `apt-get install default-jre-headless`, or "
    "`conda install openjdk`) and make sure `java -version` works in this shell."
)


class JavaNotFoundError(RuntimeError):
    """Raised when caption scoring is requested but no ``java`` is on PATH."""


def check_java() -> str:
    """Return the path of the ``java`` executable or raise `JavaNotFoundError`."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(_JAVA_HELP)
    return java


def _require_pycocoevalcap() -> None:
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise ImportError(
            "Caption metrics need pycocoevalcap; install it with "
            "`pip install 'lion-mllm[eval]'` (or `pip install pycocoevalcap`)."
        )


def spice_available() -> bool:
    """True when the Stanford CoreNLP jars SPICE needs are already on disk.

    pycocoevalcap's ``Spice()`` constructor otherwise tries to download ~400 MB from
    nlp.stanford.edu, which fails (or hangs) on an offline machine.
    """
    spec = importlib.util.find_spec("pycocoevalcap.spice.spice")
    if spec is None or spec.origin is None:
        return False
    lib = os.path.join(os.path.dirname(spec.origin), "lib")
    return all(
        os.path.exists(os.path.join(lib, name))
        for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
    )


_METEOR: Any = None
_ATEXIT_SET = False


def meteor_scorer() -> Any:
    """A shared ``pycocoevalcap`` METEOR scorer.

    METEOR runs as a long-lived Java process that needs several seconds to load its
    paraphrase tables; reusing one process across caption tasks in a session saves
    that start-up each time. `close_meteor` (also run at exit) stops it.
    """
    global _METEOR
    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        check_java()
        from pycocoevalcap.meteor.meteor import Meteor

        try:
            _METEOR = Meteor()
        except FileNotFoundError as exc:
            raise JavaNotFoundError(_JAVA_HELP) from exc
        global _ATEXIT_SET
        if not _ATEXIT_SET:
            atexit.register(close_meteor)
            _ATEXIT_SET = True
    return _METEOR


def close_meteor() -> None:
    """Stop the shared METEOR Java process, if any."""
    global _METEOR
    scorer, _METEOR = _METEOR, None
    if scorer is not None:
        proc = scorer.meteor_p
        try:
            proc.stdin.close()
        except OSError:
            pass
        proc.kill()
        proc.wait()


def _tokenize(
    gts: Mapping[Any, Sequence[str]], res: Mapping[Any, str]
) -> tuple[dict[Any, list[str]], dict[Any, list[str]]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    try:
        tok_gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
        tok_res = tokenizer.tokenize({k: [{"caption": res[k]}] for k in gts})
    except FileNotFoundError as exc:  # java vanished between check and use
        raise JavaNotFoundError(_JAVA_HELP) from exc
    return tok_gts, tok_res


def score_captions(
    gts: Mapping[Any, Sequence[str]],
    res: Mapping[Any, str],
    *,
    spice: bool | None = None,
) -> dict[str, Any]:
    """Score one generated caption per image against its reference captions.

    Args:
        gts: image id -> list of reference captions (raw text).
        res: image id -> generated caption (raw text); must cover every id in ``gts``.
        spice: ``None`` = compute SPICE only when its CoreNLP jars are present,
            ``True`` = require it, ``False`` = skip it.

    Returns:
        ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", ["SPICE"], "notes": [...],
        "per_image": {id: {"CIDEr": ...}}}`` with the raw pycocoevalcap values
        (CIDEr ~1.4 for a strong COCO model; multiply by 100 for paper tables).

    Raises:
        JavaNotFoundError: when ``java`` is not on PATH.
    """
    if not gts:
        raise ValueError("no captions to score")
    missing = [k for k in gts if k not in res]
    if missing:
        raise KeyError(f"{len(missing)} image ids have no generated caption, e.g. {missing[:3]}")
    _require_pycocoevalcap()
    check_java()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    tok_gts, tok_res = _tokenize(gts, res)
    out: dict[str, Any] = {"notes": []}
    bleu, _ = Bleu(4).compute_score(tok_gts, tok_res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        out[f"Bleu_{n}"] = float(value)
    try:
        out["METEOR"] = float(meteor_scorer().compute_score(tok_gts, tok_res)[0])
    except Exception:
        close_meteor()  # a half-read reply would desynchronise the shared process
        raise
    out["ROUGE_L"] = float(Rouge().compute_score(tok_gts, tok_res)[0])
    cider_mean, cider_each = Cider().compute_score(tok_gts, tok_res)
    out["CIDEr"] = float(cider_mean)
    out["per_image"] = {k: {"CIDEr": float(c)} for k, c in zip(tok_gts.keys(), cider_each)}

    spice_score = _spice(tok_gts, tok_res, spice, out["notes"])
    if spice_score is not None:
        out["SPICE"] = spice_score
    return out


def _spice(tok_gts: Mapping[Any, Any], tok_res: Mapping[Any, Any], spice: bool | None, notes: list[str]
           ) -> float | None:
    """SPICE, when asked for (`spice` True) or when its models are installed (None); else None, with a note
    saying why."""
    want_spice = spice_available() if spice is None else spice
    if not want_spice:
        notes.append(
            "SPICE skipped: its Stanford CoreNLP models are not installed "
            "(pycocoevalcap downloads them from nlp.stanford.edu at first use)."
        )
        return None
    if not spice_available():
        raise RuntimeError(
            "SPICE requested but the Stanford CoreNLP 3.6.0 jars are missing from "
            "pycocoevalcap/spice/lib; run `python -m pycocoevalcap.spice.get_stanford_models` "
            "with internet access, or pass spice=False."
        )
    try:
        from pycocoevalcap.spice.spice import Spice

        return float(Spice().compute_score(tok_gts, tok_res)[0])
    except Exception as exc:  # SPICE is optional: keep the other metrics
        if spice:
            raise
        notes.append(f"SPICE failed and was skipped: {exc!r}")
        return None


def cider_per_group(
    gts: Mapping[Any, Sequence[str]], res: Mapping[Any, str], groups: Mapping[Any, str]
) -> dict[str, float]:
    """CIDEr computed separately inside each group (e.g. NoCaps in/near/out-domain).

    CIDEr's document frequencies depend on the scored set, so a group score is a new
    CIDEr run over that group's images, as the NoCaps evaluation does.
    """
    _require_pycocoevalcap()
    check_java()
    from pycocoevalcap.cider.cider import Cider

    tok_gts, tok_res = _tokenize(gts, res)
    out: dict[str, float] = {}
    for name in sorted(set(groups.values())):
        keys = [k for k in tok_gts if groups.get(k) == name]
        if keys:
            score, _ = Cider().compute_score(
                {k: tok_gts[k] for k in keys}, {k: tok_res[k] for k in keys}
            )
            out[name] = float(score)
    return out
