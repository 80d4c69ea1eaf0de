"""One process or many (torchrun): process group, model wrapping (DDP or FSDP2), small collectives.

DDP wraps the whole LionModel: it puts only parameters with requires_grad into its reducer, so the
frozen ViT and T5 never take part in the gradient all-reduce. It is built with `init_sync=False`
(every rank builds the same model from the same files and seed, and broadcasting the frozen billions
would be wasted) and the trainable parameters are broadcast from rank 0 instead.
FSDP2 (`fully_shard`, for FlanT5-XXL) shards every ViT / Q-Former / T5 layer and the rest of the
model; weights are kept in float32 and gathered in bfloat16 for compute.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger("lion_mllm.train")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False
    # weak references to the wrapped (DDP/FSDP) models: they must be gone before the group is destroyed
    wrapped_models: list[weakref.ref] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums over processes (float64 for exact token and sample counts)."""
        if not self.distributed:
            return list(values)
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast_object(self, value: Any) -> Any:
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, value: Any) -> list[Any] | None:
        """Every rank's `value` on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [value]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out

    def track(self, wrapped: nn.Module) -> None:
        """Remember a model wrapped for this group; `close` waits for it to be released."""
        self.wrapped_models.append(weakref.ref(wrapped))

    def close(self) -> None:
        """Destroy the process group we created, after every wrapped model is released.

        Destroying the group while a DDP model is alive (held by an exception's traceback, say) leaves
        the reducer to be freed later, at interpreter exit, against a dead group: gloo's work thread
        then waits for the GIL while the destructor holds its mutex and the process hangs for ever.
        The caller must drop its references (`traceback.clear_frames`); reference cycles inside DDP
        are collected here. If a model is still alive the group is left to process exit, which is
        the lesser evil than a destroy that may deadlock."""
        if not (self.owns_group and dist.is_initialized()):
            return
        gc.collect()
        alive = [ref() for ref in self.wrapped_models if ref() is not None]
        if alive:
            logger.warning("a wrapped model is still referenced (%s); the process group is left to process "
                           "exit", type(alive[0]).__name__)
            return
        del alive
        dist.destroy_process_group()
        self.owns_group = False


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun set up (WORLD_SIZE > 1), or run alone. NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("run.device is cuda but no GPU is visible")
    torch_device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        owns = True
    return DistContext(rank, world_size, local_rank, torch_device, owns)


def broadcast_parameters(params: list[nn.Parameter], ctx: DistContext) -> None:
    if not ctx.distributed:
        return
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=0)


def wrap_ddp(model: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    trainable = [p for p in model.parameters() if p.requires_grad]
    broadcast_parameters(trainable, ctx)
    # buffers (position ids) are constants built identically everywhere: never synchronise them
    import inspect

    buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
    ddp = DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        init_sync=False, find_unused_parameters=find_unused_parameters, **buffers,
    )
    # what the reducer holds (DDP's own accounting): exactly the trainable tensors, never a frozen one
    stats = ddp._get_ddp_logging_data() if hasattr(ddp, "_get_ddp_logging_data") else {}
    reduced, size = stats.get("num_parameter_tensors"), stats.get("total_parameter_size_bytes")
    if reduced is not None:
        expected = sum(p.numel() * p.element_size() for p in trainable)
        logger.info("DDP: %d trainable tensors in the gradient reducer (%s bytes), %d frozen tensors left out",
                    reduced, f"{size:,}", sum(1 for p in model.parameters() if not p.requires_grad))
        if reduced != len(trainable) or size != expected:
            raise RuntimeError(f"DDP reduces {reduced} tensors ({size} bytes), expected the {len(trainable)} "
                               f"trainable ones ({expected} bytes)")
    return ddp


def wrap_fsdp2(model: nn.Module, ctx: DistContext, bf16: bool) -> nn.Module:
    """Shard each transformer layer and then the whole model (FSDP2). Weights stay float32 (frozen
    ones too: the sharded copy is small) and are gathered in bfloat16 when `bf16`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
    layers: list[nn.Module] = list(model.vision_model.layers)
    if getattr(model, "qformer", None) is not None:
        layers += list(model.qformer.encoder.layer)
    if getattr(model, "aggregator", None) is not None:
        layers += list(model.aggregator.blocks)
    layers += list(model.language_model.encoder.block) + list(model.language_model.decoder.block)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches before the last one of an accumulation step."""
    if enabled:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model
