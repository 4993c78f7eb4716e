"""Tensor-parallel communication on torch.distributed (gloo on CPU, NCCL on CUDA)."""

from pagedllm.distributed.parallel_state import (
    TensorParallelGroup,
    destroy_distributed,
    init_distributed,
    single_rank,
)

__all__ = ["TensorParallelGroup", "destroy_distributed", "init_distributed", "single_rank"]
