"""lion-mllm: LION (CVPR 2024) on current PyTorch and transformers.

The names below are imported on first use (PEP 562), so `import lion_mllm` and the `lion` command's
`--help` do not pay for torch and transformers until a model is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "Box": ".model.boxes", "format_box": ".model.boxes", "parse_box": ".model.boxes",
    "LionConfig": ".model.config", "flant5xl": ".model.config", "flant5xxl": ".model.config",
    "CheckpointError": ".errors",
    "GenerationDefaults": ".model.generation",
    "OfficialPaths": ".checkpoints.official",
    "LionModel": ".model.modeling_lion",
    "Grounding": ".lion", "Lion": ".lion",
    "ImageLoadError": ".model.processing", "LionProcessor": ".model.processing",
}

if TYPE_CHECKING:
    from .checkpoints.official import OfficialPaths
    from .errors import CheckpointError
    from .lion import Grounding, Lion
    from .model.boxes import Box, format_box, parse_box
    from .model.config import LionConfig, flant5xl, flant5xxl
    from .model.generation import GenerationDefaults
    from .model.modeling_lion import LionModel
    from .model.processing import ImageLoadError, LionProcessor


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lion_mllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def load_model(name_or_path: str, *, device: str = "cpu", dtype: str | None = None, **kwargs: Any) -> Lion:
    """A `Lion` from a bundle directory, `hf-hub:`/`local-dir:` name, the authors' YAML config, or an
    installed name (`lion-shapes`, built in; `lion-flant5xl` after `lion download`). The model comes with
    its tagger and generation config (decoding defaults, prompt templates)."""
    from .checkpoints.hub import resolve_model
    from .lion import Lion

    if str(name_or_path).endswith((".yaml", ".yml")):  # read as it is: its errors name the YAML's keys
        return Lion.from_official(name_or_path, device=device, dtype=dtype, **kwargs)
    resolved = resolve_model(name_or_path)
    if resolved.endswith((".yaml", ".yml")):  # an installed name whose download wrote the authors' YAML
        return Lion.from_official(resolved, device=device, dtype=dtype, **kwargs)
    return Lion.from_pretrained(resolved, device=device, dtype=dtype, **kwargs)


__all__ = ["Box", "CheckpointError", "GenerationDefaults", "Grounding", "ImageLoadError", "Lion", "LionConfig",
           "LionModel", "LionProcessor", "OfficialPaths", "flant5xl", "flant5xxl", "format_box", "load_model",
           "parse_box"]
