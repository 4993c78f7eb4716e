"""Backend: the kernels one model runs on, chosen once per engine by the selector (device,
dtype, CPU ISA): an attention backend, a linear backend and the small per-token kernels.
Layers hold their part (``attention_backend``, ``linear_backend``, ``kernels``) and ask it;
nothing above the backend copies its limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from pagedllm.model_executor.backends.kernels import TorchKernels
from pagedllm.model_executor.backends.linear import TorchLinearBackend
from pagedllm.model_executor.backends.torch_attention import TorchAttentionBackend


@dataclass(frozen=True)
class Backend:
    name: str  # "torch", "avx2", "avx512", "avx512bf16", "amx"
    attention: TorchAttentionBackend
    linear: TorchLinearBackend
    kernels: TorchKernels

    def describe(self) -> str:
        return (
            f"{self.name} (attention: {self.attention.describe()}; linear: "
            f"{self.linear.describe()}; norms/RoPE/activation/argmax: {self.kernels.name})"
        )

    def bind(self, model: nn.Module) -> None:
        """Hand each layer of ``model`` its part of this backend."""
        parts: dict[str, Any] = {
            "attention_backend": self.attention,
            "linear_backend": self.linear,
            "kernels": self.kernels,
        }
        for module in model.modules():
            for attr, part in parts.items():
                if hasattr(type(module), attr):
                    setattr(module, attr, part)


TORCH_BACKEND = Backend("torch", TorchAttentionBackend(), TorchLinearBackend(), TorchKernels())
