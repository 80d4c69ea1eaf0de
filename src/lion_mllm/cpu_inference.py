"""An opt-in float32 CPU inference path: every `nn.Linear` of a model computed by oneDNN.

PyTorch's `F.linear` on CPU goes to MKL's sgemm; `torch.ops.mkldnn._linear_pointwise` (the kernel
torch's own inductor emits for CPU linear layers) computes the same product with oneDNN. The two sum
in a different order, so their outputs differ in the last bits (about 1e-7 relative), not bit for bit:
which one is faster depends on the CPU and on the matrix shapes (see docs/benchmarks.md, "CPU
inference paths"), and the token ids can in principle differ where two candidates' scores tie to
within that rounding. Hence opt-in: `use_onednn_linear(model)`.

Only inference is rerouted: with autograd on (training, or any call outside `torch.no_grad()` /
`torch.inference_mode()`), on another device or in another dtype, the layer runs `F.linear` exactly as
`nn.Linear` does. The swap changes a module's class and nothing else (same parameters, same
`state_dict`), and the layer keeps no state, so a model may be switched while other threads run it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN and the fused linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDnnLinear(nn.Linear):
    """`nn.Linear` whose no-grad float32 CPU forward runs oneDNN's matmul; otherwise `F.linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or input.device.type != "cpu" or input.dtype != torch.float32
                or self.weight.dtype != torch.float32 or input.dim() < 2):
            return F.linear(input, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(input, self.weight, self.bias, "none", [], "")


def use_onednn_linear(model: nn.Module, enabled: bool = True) -> int:
    """Switch every `nn.Linear` of `model` to the oneDNN path (`enabled=False`: back to `nn.Linear`).

    Returns the number of layers switched. Subclasses of `nn.Linear` other than these two are left as
    they are (their forward may do more than a matmul). Raises RuntimeError if this torch build has no
    oneDNN.
    """
    if enabled and not onednn_linear_available():
        raise RuntimeError("this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)")
    source, target = (nn.Linear, OneDnnLinear) if enabled else (OneDnnLinear, nn.Linear)
    switched = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            switched += 1
    return switched


def uses_onednn_linear(model: nn.Module) -> bool:
    """Whether any linear layer of `model` runs the oneDNN path."""
    return any(type(module) is OneDnnLinear for module in model.modules())
