"""lion-mllm: LION (CVPR 2024) on current PyTorch and transformers."""

from .boxes import Box, format_box, parse_box
from .config import LionConfig, flant5xl, flant5xxl
from .loading import CheckpointError, OfficialPaths
from .modeling_lion import LionModel
from .pipeline import Grounding, Lion
from .processing import ImageLoadError, LionProcessor

__version__ = "0.1.0"


def load_model(name_or_path: str, *, device: str = "cpu", dtype: str | None = None, **kwargs) -> Lion:
    """A `Lion` from a bundle directory, `hf-hub:`/`local-dir:` name, the authors' YAML config, or an
    installed name (`lion-shapes`, built in; `lion-flant5xl` after `lion download`)."""
    from .hub import resolve_model

    if str(name_or_path).endswith((".yaml", ".yml")):
        return Lion.from_official(name_or_path, device=device, dtype=dtype, **kwargs)
    return Lion.from_pretrained(resolve_model(name_or_path), device=device, dtype=dtype, **kwargs)


__all__ = ["Box", "CheckpointError", "Grounding", "ImageLoadError", "Lion", "LionConfig", "LionModel",
           "LionProcessor", "OfficialPaths", "flant5xl", "flant5xxl", "format_box", "load_model", "parse_box"]
