"""lion-mllm: LION (CVPR 2024) on current PyTorch and transformers.

The names below are imported on first use (PEP 562), so `import lion_mllm` and the `lion` command's
`--help` do not pay for torch and transformers until a model is needed.

Modules moved into the `model` and `checkpoints` subpackages (and `pipeline` -> `lion`, `batch` -> `run`)
keep their old names for one release: `_MovedModules` below answers an old name with the new module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# module name before the layout of #27 -> its name now; the old names go in the next release
_MOVED_MODULES: dict[str, str] = {
    "lion_mllm.pipeline": "lion_mllm.lion",
    "lion_mllm.batch": "lion_mllm.run",
    **{f"lion_mllm.{name}": f"lion_mllm.model.{name}"
       for name in ("boxes", "config", "cpu_inference", "generation", "images", "modeling_lion", "processing",
                    "resample", "taggers", "tasks")},
    **{f"lion_mllm.{name}": f"lion_mllm.checkpoints.{name}"
       for name in ("bundle", "checkpoint_files", "downloads", "hub", "official")},
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as its new module: sys.modules[old] is the new module object itself (so
    monkeypatching either name patches both, and isinstance holds across them), with a DeprecationWarning
    naming the new path. First on sys.meta_path, so a stale old file left in an install cannot shadow it."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in _MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        new = _MOVED_MODULES[spec.name]
        # stacklevel 2: the importing line (the warnings machinery skips importlib's own frames)
        warnings.warn(f"{spec.name} is now {new}; the old name goes in the next release", DeprecationWarning,
                      stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the old name's: put it back below
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the new module is imported already) but to give it back its own spec, which its
        relative imports and `importlib.reload` go by."""
        module.__spec__ = module.__spec__.loader_state


sys.meta_path.insert(0, _MovedModules())

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
