"""Gemma 3 text decoder (Gemma3ForCausalLM, e.g. gemma-3-270m), on the Llama family's layers.

What differs from Llama: embeddings scaled by sqrt(hidden_size); RMSNorm multiplies by
(1 + weight), so the loader stores 1 + w once; four norms per layer (around attention and
around the MLP, the residual added after the post-norms); q and k normalized per head
(QK-norm); GeGLU (tanh GELU) MLP; attention scaled by query_pre_attn_scalar ** -0.5; and
layers of two kinds (``layer_types``): sliding-window layers (window ``sliding_window``, RoPE
base ``rope_local_theta``) and global ones (RoPE base ``rope_theta``), 5 : 1 in Gemma 3.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.distributed import TensorParallelGroup, single_rank
from pagedllm.model_executor.backends.attention_metadata import AttentionMetadata
from pagedllm.model_executor.layers.activation import GeluTanhAndMul
from pagedllm.model_executor.layers.attention import PagedAttention
from pagedllm.model_executor.layers.layernorm import RMSNorm
from pagedllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    split_rows,
)
from pagedllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from pagedllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from pagedllm.model_executor.models.hf_config import ArchConfig
from pagedllm.model_executor.models.llama import (
    PACKED_MODULES,
    LlamaAttention,
    LlamaForCausalLM,
    check_tensor_parallel,
    kv_head_layout,
)

SLIDING = "sliding_attention"


def layer_kinds(cfg: ArchConfig) -> tuple[str, ...]:
    """Each layer's kind; without ``layer_types``, Gemma 3's pattern (every 6th global)."""
    if cfg.layer_types:
        return cfg.layer_types
    return tuple("full_attention" if (i + 1) % 6 == 0 else SLIDING for i in range(cfg.num_layers))


class Gemma3Attention(LlamaAttention):
    def __init__(
        self, cfg: ArchConfig, rotary: RotaryEmbedding, tp: TensorParallelGroup, sliding: bool
    ) -> None:
        super().__init__(cfg, rotary, tp)  # its PagedAttention is replaced below
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.attn = PagedAttention(self.scale, cfg.sliding_window if sliding else None)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim))
        v = v.reshape(-1, self.num_kv_heads, self.head_dim).contiguous()  # k's row stride
        q, k = self.rotary(positions, q.contiguous(), k.contiguous())
        out = self.attn(q, k, v, meta)
        return self.o_proj(out.reshape(-1, self.q_size))


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: TensorParallelGroup) -> None:
        super().__init__()
        rows = split_rows(cfg.intermediate_size, tp, "the MLP's intermediate size")
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [rows, rows], bias=False)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, tp)
        self.act = GeluTanhAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ArchConfig, rotary: RotaryEmbedding, tp: TensorParallelGroup, sliding: bool
    ) -> None:
        super().__init__()
        self.self_attn = Gemma3Attention(cfg, rotary, tp, sliding)
        self.mlp = Gemma3MLP(cfg, tp)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.compute_dtype = torch.float32  # the matmul dtype, set by the model runner

    def forward(
        self, positions: torch.Tensor, residual: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """residual: the fp32 residual stream -> the next one."""
        dtype = self.compute_dtype
        attn = self.self_attn(positions, self.input_layernorm(residual, dtype), meta)
        residual = residual + self.post_attention_layernorm(attn.float(), torch.float32)
        mlp = self.mlp(self.pre_feedforward_layernorm(residual, dtype))
        return residual + self.post_feedforward_layernorm(mlp.float(), torch.float32)


class Gemma3Model(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.embed_scale = cfg.hidden_size**0.5
        positions = cfg.max_position_embeddings
        global_rope = RotaryEmbedding(cfg.head_dim, positions, cfg.rope_theta, cfg.rope_scaling)
        local_rope = RotaryEmbedding(cfg.head_dim, positions, cfg.rope_local_theta or 10000.0)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(
                cfg, local_rope if kind == SLIDING else global_rope, tp, kind == SLIDING
            )
            for kind in layer_kinds(cfg)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        emb = self.embed_tokens(input_ids)
        # transformers scales in the embedding's dtype
        residual = (emb * torch.tensor(self.embed_scale, dtype=emb.dtype)).float()
        for layer in self.layers:
            residual = layer(positions, residual, meta)
        return self.norm(residual, torch.float32)


def gemma3_kv_window(cfg: ArchConfig) -> int | None:
    """The window when every layer is a sliding one (never in Gemma 3's own 5 : 1 pattern)."""
    if cfg.sliding_window and all(k == "sliding_attention" for k in layer_kinds(cfg)):
        return cfg.sliding_window
    return None


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Loading, logits and LoRA names as the Llama family's; the layers above."""

    check_tensor_parallel = staticmethod(check_tensor_parallel)
    kv_window = staticmethod(gemma3_kv_window)
    packed_modules_mapping = PACKED_MODULES

    def __init__(self, cfg: ArchConfig, tp: TensorParallelGroup | None = None) -> None:
        nn.Module.__init__(self)
        tp = tp or single_rank()
        check_tensor_parallel(cfg, tp.world_size)
        if len(layer_kinds(cfg)) != cfg.num_layers:
            raise ValueError(
                f"layer_types lists {len(layer_kinds(cfg))} layers, the model has {cfg.num_layers}"
            )
        self.config = cfg
        self.num_kv_heads = kv_head_layout(cfg, tp)[0]
        self.model = Gemma3Model(cfg, tp)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Norm weights w are stored as the factor they multiply by, 1 + w (in fp32, as
        transformers computes it)."""

        def with_norm_offset():
            for name, tensor in weights:
                if name.endswith("norm.weight"):
                    tensor = 1.0 + tensor.float()
                yield name, tensor

        super().load_weights(with_norm_offset())
