"""Which device a model is loaded on: the one asked for if this machine has it, checked before loading.

The API (`Lion.from_pretrained`, `Lion.from_official`), the server and the model options of every `lion`
command use it. It imports torch only when called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DeviceUnavailableError", "available_devices", "resolve_device"]


class DeviceUnavailableError(ValueError):
    """A device this machine does not have (the message lists those it has)."""


def available_devices() -> list[str]:
    """The devices of this machine, as `torch.device` names: cpu, then cuda and each GPU, then mps."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def resolve_device(requested: str | None, label: str = "--device") -> str:
    """The device to load on: `requested` if this machine has it (else DeviceUnavailableError listing
    what it has, naming the option or argument `label`), or cuda when a GPU is available, else cpu."""
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    available = ", ".join(available_devices())
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise DeviceUnavailableError(f"{label} {requested}: not a device name; available here: {available}") from None
    problem = _missing(torch, device)
    if problem is not None:
        raise DeviceUnavailableError(f"{label} {requested}: {problem}; available here: {available}")
    return requested


def _missing(torch: Any, device: Any) -> str | None:
    """Why this machine cannot run on `device`, or None when it can."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"no CUDA GPU here ({'a CPU-only build of torch' if torch.version.cuda is None else 'no GPU visible'})"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} GPU(s)"
        return None
    if device.type == "mps":
        return None if "mps" in available_devices() else "not available here"
    return None if device.type == "cpu" else "unsupported device type"
