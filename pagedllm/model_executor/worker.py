"""Worker: one tensor-parallel rank. It holds a ModelRunner over its shard of the weights and of
the KV cache, and runs the calls its executor sends: rank 0's worker lives in the engine process
and answers; the others (worker processes or Ray actors) run ``serve_calls``, taking each call
from a broadcast of rank 0."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from pagedllm.config import PoolerConfig
from pagedllm.distributed import TensorParallelGroup, destroy_distributed, init_distributed
from pagedllm.model_executor.loader import ModelSource, iter_weights, resolve_model
from pagedllm.model_executor.model_runner import ModelRunner
from pagedllm.model_executor.models.hf_config import ArchConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a rank needs to build its runner; picklable, sent to every worker."""

    source: ModelSource
    arch: ArchConfig
    dtype: str
    device: str
    kv_cache_dtype: str
    quantization: str | None
    block_size: int
    seed: int
    world_size: int = 1
    # Per-rank CPU core lists (PAGEDLLM_CPU_THREADS_BIND); None: split the cores evenly.
    cpu_binds: tuple[tuple[int, ...], ...] | None = None
    dist_timeout_s: float = 120.0
    pooler_config: PoolerConfig | None = None  # a pooling runner (embeddings)
    max_lora_rank: int | None = None  # LoRA adapters enabled (--enable-lora)
    deterministic: bool = False  # batch-invariant kernels (--deterministic)


class Worker:
    def __init__(self, config: WorkerConfig, rank: int) -> None:
        """Builds this rank's runner and loads its weight shard; ``join`` connects it to the
        other ranks afterwards (so a worker that fails to load says why before any rank waits
        on a collective)."""
        self.config = config
        self.tp = TensorParallelGroup(rank, config.world_size)
        if config.world_size > 1 and config.device == "cpu":
            bind_cpu_threads(rank, config.world_size, config.cpu_binds)
        torch.manual_seed(config.seed)
        source = config.source
        if not os.path.exists(source.path):  # another node: find the model there
            source = resolve_model(source.model)
        self.runner = ModelRunner(
            config.arch,
            config.dtype,
            torch.device(config.device),
            config.kv_cache_dtype,
            config.quantization,
            block_size=config.block_size,
            tp=self.tp,
            pooler_config=config.pooler_config,
            max_lora_rank=config.max_lora_rank,
            deterministic=config.deterministic,
        )
        self.runner.load_weights(iter_weights(source, config.quantization))

    def join(self, init_method: str) -> None:
        if self.config.world_size > 1:
            init_distributed(
                self.tp.rank,
                self.config.world_size,
                init_method,
                self.config.device,
                self.config.dist_timeout_s,
            )

    # ---- the calls an executor makes on every rank ---------------------------------------------
    def kv_bytes_per_block(self, block_size: int) -> int:
        return self.runner.kv_bytes_per_block(block_size)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.runner.allocate_kv_cache(num_blocks, block_size)

    def execute_model(self, scheduler_output):
        return self.runner.execute_model(scheduler_output)

    def forward_logits(self, scheduler_output, all_positions: bool = False):
        return self.runner.forward_logits(scheduler_output, all_positions)

    def add_lora(self, request) -> str | None:
        """Load a LoRA adapter; -> None, or why it cannot be (returned, not raised: a worker
        rank raising would leave its call loop)."""
        assert self.runner.lora is not None, "LoRA is not enabled"
        try:
            self.runner.lora.add(request)
        except (ValueError, OSError) as err:
            return str(err)
        return None

    def remove_lora(self, lora_id: int) -> bool:
        assert self.runner.lora is not None, "LoRA is not enabled"
        return self.runner.lora.remove(lora_id)

    def num_request_states(self) -> int:
        """Requests whose state this rank still keeps (0 once all finished: no leak)."""
        return len(self.runner.requests)

    def pid(self) -> int:
        return os.getpid()

    # ---- worker ranks --------------------------------------------------------------------------
    def serve_calls(self) -> None:
        """Run rank 0's calls until it broadcasts None (shutdown); results stay here unless
        the call asks for every rank's (gathered to rank 0)."""
        try:
            while True:
                call = self.tp.broadcast_object()
                if call is None:
                    return
                method, args, gather = call
                result = getattr(self, method)(*args)
                if gather:
                    gather_to_driver(result, self.tp)
        finally:
            destroy_distributed()


def gather_to_driver(value: Any, tp: TensorParallelGroup) -> list[Any] | None:
    import torch.distributed as dist

    out = [None] * tp.world_size if tp.is_driver else None
    dist.gather_object(value, out, dst=0)
    return out


def bind_cpu_threads(rank: int, world_size: int, binds: tuple[tuple[int, ...], ...] | None) -> None:
    """Pin this rank to its cores and use one torch thread per core, so ranks on one machine
    do not fight over cores. Without explicit binds the cores are split evenly; with fewer
    cores than ranks each rank gets one thread and no pinning."""
    cores = sorted(os.sched_getaffinity(0))
    if binds is not None:
        mine = binds[rank]
    elif len(cores) >= world_size:
        per = len(cores) // world_size
        mine = tuple(cores[rank * per : (rank + 1) * per])
    else:
        torch.set_num_threads(1)
        return
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    logger.info("rank %d runs on cores %s", rank, list(mine))
