"""Process-group setup for torchrun (and plain single-process runs)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from visioncoach.config import DistConfig


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when running as a single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: DistConfig) -> DistInfo:
    """Join torchrun's process group when launched by it; otherwise run as one process.

    nccl with CUDA, gloo on CPU (``dist.backend=auto``). Each rank takes GPU ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise RuntimeError("config key 'dist.backend' is nccl but no CUDA device is visible; use gloo or auto")
    if "MASTER_ADDR" not in os.environ:
        if world > 1:
            raise RuntimeError(f"WORLD_SIZE={world} without MASTER_ADDR: launch with torchrun")
        return DistInfo(rank, world, local_rank, device, None)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s),
                                device_id=device if cuda else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# Bytes per all-reduce bucket: bounds the flat copy (one bucket at a time) while keeping the
# number of collectives small.
_BUCKET_BYTES = 64 << 20


def allreduce_gradients(params: list[torch.Tensor], world_size: int) -> None:
    """Average ``.grad`` of ``params`` over ranks, in place, one all-reduce per bucket.

    Every rank must pass the same parameter list. A parameter without a gradient on this rank
    gets zeros first, so all ranks reduce the same tensors (and all end with the same grads).
    """
    if world_size <= 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params + [None]:
        if p is not None and (not bucket or (p.grad.dtype == bucket[0].dtype
                                             and size + p.grad.numel() * p.grad.element_size() <= _BUCKET_BYTES)):
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
            continue
        if bucket:
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat.div_(world_size)
            for g, v in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                g.copy_(v)
        if p is not None:
            bucket, size = [p.grad], p.grad.numel() * p.grad.element_size()
