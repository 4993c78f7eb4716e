"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) in plain torch ops.

Checkpoint names map onto fused layers: q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj.

Precision: the residual stream, norms, RoPE and logits stay fp32; only the matmuls (and the KV
cache) use the engine dtype. In fp32 this is exactly HF's arithmetic; in bf16 it keeps the
answers of a small model coherent where a pure-bf16 residual stream drifts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.model_executor.backends.attention_metadata import AttentionMetadata
from pagedllm.model_executor.layers.activation import SiluAndMul
from pagedllm.model_executor.layers.attention import PagedAttention
from pagedllm.model_executor.layers.layernorm import RMSNorm
from pagedllm.model_executor.layers.linear import Linear
from pagedllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from pagedllm.model_executor.models.hf_config import ArchConfig

# checkpoint name fragment -> (fused parameter fragment, shard index)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class FusedLinear(Linear):
    """A linear layer whose output rows are several checkpoint tensors stacked (shards)."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        self.shard_sizes = shard_sizes

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int) -> None:
        start, size = self.shard_offsets[shard], self.shard_sizes[shard]
        if loaded.shape[0] != size:
            raise ValueError(f"shard {shard} has {loaded.shape[0]} rows, expected {size}")
        param.data[start : start + size].copy_(loaded)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ArchConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = FusedLinear(
            cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=cfg.qkv_bias
        )
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.rotary = rotary
        self.attn = PagedAttention(self.scale)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, meta)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = FusedLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, bias=cfg.mlp_bias
        )
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.compute_dtype = torch.float32  # the matmul dtype, set by the model runner

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the previous layer's MLP output (or, first layer, the fp32 embeddings);
        residual: the fp32 residual stream, updated in place. -> (MLP output, residual)."""
        dtype = self.compute_dtype
        if residual is None:
            residual = hidden
            h = self.input_layernorm(residual, dtype)
        else:
            h = self.input_layernorm.add_and_norm(residual, hidden, dtype)
        attn = self.self_attn(positions, h, meta)
        h = self.post_attention_layernorm.add_and_norm(residual, attn, dtype)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids).float(), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        return self.norm.add_and_norm(residual, hidden, torch.float32)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """-> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the lm_head's dtype from the fp32 final hidden state. Left unwidened: greedy
        decoding takes the argmax of bf16 logits as they are (exact), the sampler widens the
        rest to fp32 (a [B, V] fp32 copy was 4 ms of a 110 ms decode step at B=160)."""
        weight = self.lm_head.weight
        return self.lm_head(hidden if weight.dtype == hidden.dtype else hidden.to(weight.dtype))

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in, casting to each parameter's dtype. Every parameter must be
        loaded exactly once (a tied lm_head may be absent)."""
        params = dict(self.named_parameters(remove_duplicate=False))
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some checkpoints store the tied copy too
            target, shard = name, None
            for ckpt, (fused, idx) in PACKED_MODULES.items():
                if f".{ckpt}." in name:
                    target, shard = name.replace(f".{ckpt}.", f".{fused}."), idx
                    break
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} matches no model parameter")
            param = params[target]
            if shard is None:
                if param.shape != tensor.shape:
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}"
                    )
                param.data.copy_(tensor)
                loaded.add(target)
            else:
                module_name, _, _ = target.rpartition(".")
                modules[module_name].load_shard(param, tensor, shard)
                loaded.add(f"{target}#{shard}")
        self._check_all_loaded(params, modules, loaded)

    def _check_all_loaded(self, params, modules, loaded: set[str]) -> None:
        missing = []
        for name in params:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            module_name, _, _ = name.rpartition(".")
            module = modules[module_name]
            if isinstance(module, FusedLinear):
                missing += [
                    f"{name}#{i}"
                    for i in range(len(module.shard_sizes))
                    if f"{name}#{i}" not in loaded
                ]
            elif name not in loaded:
                missing.append(name)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:8]}")
