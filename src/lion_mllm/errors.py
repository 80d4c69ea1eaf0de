"""The loader's one error type, importable without torch (the CLI catches it before any model exists)."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint, bundle or model config that cannot be used: missing or extra weights, a wrong shape,
    a config that does not fit the schema, a tokenizer without `<extra_id_0>`, a file of the wrong kind.
    The message names the file and, where there is one, the fix."""
