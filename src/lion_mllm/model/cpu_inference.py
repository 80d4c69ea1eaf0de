"""CPU inference options: oneDNN linear layers (float32, opt-in), and how to compare reduced-precision ids.

bfloat16 on CPU is a model option, not a switch here: load with `dtype="bfloat16"` (`Lion.from_official`,
`Lion.from_pretrained`, `load_model`, `--dtype bfloat16`); the weights are stored and multiplied in bf16
(oneDNN, on AMX where the CPU has it). Its ids are not the float32 ids bit for bit: `id_agreement`
measures how far they agree (docs/benchmarks.md has the measured figures).

oneDNN linear layers (float32):

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


def id_agreement(ours: list[list[list[int]]], reference: list[list[list[int]]]) -> dict[str, float]:
    """How far the token ids of several calls (each a list of sequences that start with the decoder start
    token) agree with a reference's: the number of identical sequences, and the mean share of each
    sequence's generated tokens before its first difference. Positions after a difference are not
    counted: from there the two decodings condition on different prefixes."""
    pairs = [(a, b) for call, ref in zip(ours, reference, strict=True) for a, b in zip(call, ref, strict=True)]

    def common_prefix(a: list[int], b: list[int]) -> float:
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return (same - 1) / (max(len(a), len(b)) - 1)

    return {"sequences": len(pairs), "identical_sequences": sum(a == b for a, b in pairs),
            "mean_common_prefix": sum(common_prefix(a, b) for a, b in pairs) / len(pairs)}
