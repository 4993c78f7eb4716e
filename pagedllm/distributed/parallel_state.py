"""The tensor-parallel group a model's layers communicate over: torch.distributed's default
process group, one rank per worker (gloo between CPU processes, NCCL between GPUs).

The group is passed to the model explicitly (``TensorParallelGroup``) rather than read from a
global, so a single-rank engine built in the same process as a sharded one stays unsharded.
torch.distributed has one default group per process, so a process holds at most one
multi-rank engine at a time.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    world_size: int = 1

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def shard(self, size: int, what: str) -> int:
        """This rank's part of ``size`` (heads, rows); a ValueError when it does not divide."""
        if size % self.world_size:
            raise ValueError(
                f"{what} ({size}) is not divisible by --tensor-parallel-size {self.world_size}"
            )
        return size // self.world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks. Partial sums of a low-precision matmul are added in fp32 and rounded
        once, as a single rank's GEMM accumulates."""
        if self.world_size == 1:
            return x
        wide = x if x.dtype == torch.float32 else x.float()
        dist.all_reduce(wide)
        return wide if wide is x else wide.to(x.dtype)

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's ``x`` (same shape) concatenated along the last dim; others:
        None."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_driver else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0 sends ``obj`` (any picklable value); every rank returns it."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def single_rank() -> TensorParallelGroup:
    return TensorParallelGroup()


def init_distributed(
    rank: int, world_size: int, init_method: str, device: str = "cpu", timeout_s: float = 120.0
) -> TensorParallelGroup:
    """Join the process group ``init_method`` (tcp://host:port) names. ``timeout_s`` bounds the
    rendezvous and every collective, so a lost peer surfaces as an error, not a hang."""
    if dist.is_initialized():
        raise RuntimeError(
            "this process already holds a tensor-parallel engine; shut it down first"
        )
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    logger.info("rank %d/%d joined the %s process group", rank, world_size, backend)
    return TensorParallelGroup(rank, world_size)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
