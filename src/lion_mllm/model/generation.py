"""How a model is meant to be asked: its decoding defaults and prompt templates (`generation_config.json`).

A bundle records these as the model was trained, so every caller (the Python API, every `lion` command,
the server) decodes the model the same way without flags::

    lion = load_model("lion-shapes")
    lion.generation_config.for_task("vqa")          # {'num_beams': 1, ..., 'repetition_penalty': 1.0}
    lion.generation_config.prompt("vqa", "How many circles are there?")
    # 'Question: How many circles are there? Short answer:'

Explicit arguments (API keyword arguments, CLI flags, request fields) override these defaults. The
defaults of this module are the authors' LION settings (5 beams, up to 256 new tokens, repetition
penalty 1.5, questions passed as typed), used for the authors' YAML and for bundles without the file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .tasks import CAPTION_PROMPT, GROUNDING_TEMPLATE, PROMPT_KINDS, VQA_TEMPLATE, canonical_task

__all__ = ["DECODING_FIELDS", "DECODING_RULES", "GENERATION_CONFIG_FILE", "DecodingSettings", "GenerationDefaults"]

GENERATION_CONFIG_FILE = "generation_config.json"

_PLACEHOLDERS = {"caption": None, "vqa": "question", "grounding": "phrase"}

# The `Lion.generate` keyword arguments a generation config sets.
DECODING_FIELDS = ("num_beams", "max_new_tokens", "min_length", "repetition_penalty", "length_penalty",
                   "do_sample", "temperature", "top_p")


TRANSFORMERS_TOP_K = 50  # transformers' sampling default, which `Lion.generate` has always sampled with


@dataclass(frozen=True)
class DecodingSettings:
    """How one request is decoded, as `LionModel.generate`'s (transformers') arguments of the same names
    mean it; its values obey `DECODING_RULES`. The decode engine, the API, the server's requests and web page
    and the scorers all take this type, made by `GenerationDefaults.settings` from a model's generation
    config. The field defaults here are the neutral settings (greedy, no penalty, no nucleus cut), not a
    model's defaults: those are its generation config's (the authors': `GenerationDefaults()`)."""

    max_new_tokens: int
    num_beams: int = 1
    min_length: int = 1  # of the decoder sequence, start token included (transformers' `min_length`)
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0  # beam search only
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TRANSFORMERS_TOP_K
    num_return_sequences: int = 1
    seed: int | None = None  # sampling: the request's own generator starts from it

    def __post_init__(self) -> None:
        _check_decoding(dataclasses.asdict(self), "decoding settings")
        if self.num_beams > 1 and not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError(f"decoding settings: num_return_sequences ({self.num_return_sequences}) cannot "
                             f"exceed num_beams ({self.num_beams})")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences != 1:
            raise ValueError("decoding settings: greedy decoding returns one sequence; sample (do_sample) or "
                             "use beams for several")

    @property
    def slots(self) -> int:
        """Decoder sequences this request keeps in the engine's cache at once."""
        return self.num_beams if self.num_beams > 1 else self.num_return_sequences

    def replace(self, **changes: Any) -> DecodingSettings:
        return dataclasses.replace(self, **changes)


def _default_prompts() -> dict[str, str]:
    return {"caption": CAPTION_PROMPT, "vqa": VQA_TEMPLATE, "grounding": GROUNDING_TEMPLATE}


@dataclass(frozen=True)
class GenerationDefaults:
    """Decoding defaults and prompt templates of one model.

    `prompts`: per task, the caption instruction (`caption`), the question template with `{question}`
    (`vqa`) and the phrase template with `{phrase}` (`grounding`). `task_decoding`: per-task overrides of
    the decoding fields, e.g. `{"caption": {"max_new_tokens": 30}}`.
    """

    num_beams: int = 5
    max_new_tokens: int = 256
    min_length: int = 1
    repetition_penalty: float = 1.5
    length_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    prompts: Mapping[str, str] = field(default_factory=_default_prompts)
    task_decoding: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_decoding(self.decoding_fields(), "generation config")
        prompts = {**_default_prompts(), **dict(self.prompts)}
        for task, template in prompts.items():
            if task not in PROMPT_KINDS:
                raise ValueError(f"generation config: prompts has unknown task {task!r} (known: {list(PROMPT_KINDS)})")
            if not isinstance(template, str) or not template.strip():
                raise ValueError(f"generation config: prompts.{task} must be a non-empty string")
            placeholder = _PLACEHOLDERS[task]
            try:
                filled = template.format(**({placeholder: "\0"} if placeholder else {}))
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(f"generation config: prompts.{task} {template!r} is not a valid template "
                                 f"(only {{{placeholder}}} may appear)" if placeholder else
                                 f"generation config: prompts.{task} {template!r} must hold no {{...}} field"
                                 ) from error
            if placeholder and "\0" not in filled:
                raise ValueError(f"generation config: prompts.{task} {template!r} lacks {{{placeholder}}}")
        per_task = {}
        for task, overrides in dict(self.task_decoding).items():
            if task not in PROMPT_KINDS:
                raise ValueError(f"generation config: task_decoding has unknown task {task!r} (known: {list(PROMPT_KINDS)})")
            unknown = sorted(set(overrides) - set(DECODING_FIELDS))
            if unknown:
                raise ValueError(f"generation config: task_decoding.{task} has unknown fields {unknown}")
            _check_decoding({**self.decoding_fields(), **overrides}, f"generation config task_decoding.{task}")
            per_task[task] = dict(overrides)
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "task_decoding", per_task)

    # -- use ----------------------------------------------------------------------------------------

    def decoding_fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in DECODING_FIELDS}

    def for_task(self, task: str) -> dict[str, Any]:
        """`Lion.generate` keyword arguments for one task (its overrides applied)."""
        return {**self.decoding_fields(), **self.task_decoding.get(canonical_task(task), {})}

    def settings(self, task: str, **overrides: Any) -> DecodingSettings:
        """The decoding settings of one `task` sample: the model's defaults (with the task's overrides),
        then `overrides` where not None."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return DecodingSettings(**{**self.for_task(task), **given})

    def for_tasks(self, tasks: Sequence[str]) -> dict[str, Any]:
        """Keyword arguments for one batch: the tasks' common settings. A batch decodes with one set, so
        tasks whose overrides disagree fall back to the model-wide defaults."""
        settings = [self.for_task(t) for t in dict.fromkeys(tasks)]
        if settings and all(s == settings[0] for s in settings):
            return settings[0]
        return self.decoding_fields()

    def prompt(self, task: str, text: str | None = None) -> str:
        """The model prompt for `text`: the question (vqa) or phrase (grounding) put into the model's
        template; for captions `text` replaces the default instruction when given."""
        kind = canonical_task(task)
        template = self.prompts[kind]
        if kind == "caption":
            return text if text else template
        if text is None or not str(text).strip():
            raise ValueError(f"a {kind} prompt needs a {_PLACEHOLDERS[kind]}")
        return template.format(**{_PLACEHOLDERS[kind]: text})

    def replace(self, **changes: Any) -> GenerationDefaults:
        return dataclasses.replace(self, **changes)

    # -- files --------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {**self.decoding_fields(), "prompts": dict(self.prompts),
                "task_decoding": {k: dict(v) for k, v in self.task_decoding.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path = "generation config") -> GenerationDefaults:
        """From `to_dict`'s form; any problem is a CheckpointError naming `source`."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{source}: expected a mapping of generation settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{source}: unknown generation settings {unknown} (known: {sorted(known)})")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: {error}") from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / GENERATION_CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> GenerationDefaults:
        """A bundle's `generation_config.json`; the authors' defaults when the bundle has none."""
        path = Path(directory) / GENERATION_CONFIG_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: not a readable JSON file ({error}); fix or delete it") from None
        return cls.from_dict(data, path)


def _is_count(least: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# The one set of rules for decoding values, wherever they come from (a generation config, API keyword
# arguments, CLI flags, a server request): field -> (test, what the value must be).
DECODING_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_beams": (_is_count(1), "an integer of at least 1"),
    "max_new_tokens": (_is_count(1), "an integer of at least 1"),
    "num_return_sequences": (_is_count(1), "an integer of at least 1"),
    "min_length": (_is_count(0), "an integer of at least 0"),
    "repetition_penalty": (lambda v: _is_number(v) and v > 0, "a number greater than 0"),
    "temperature": (lambda v: _is_number(v) and v > 0, "a number greater than 0"),
    "length_penalty": (_is_number, "a number"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "top_k": (_is_count(0), "an integer of at least 0"),
    "seed": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer"),
}


def _check_decoding(values: Mapping[str, Any], where: str) -> None:
    """ValueError (its message starting with `where`) for the first of `values` outside `DECODING_RULES`."""
    for name, value in values.items():
        if name in DECODING_RULES:
            valid, wanted = DECODING_RULES[name]
            if not valid(value):
                raise ValueError(f"{where}: {name} must be {wanted}, got {value!r}")
