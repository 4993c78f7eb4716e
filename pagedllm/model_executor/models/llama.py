"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) in plain torch ops.

Checkpoint names map onto fused layers: q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj.
Under tensor parallelism (vLLM's Megatron split) each rank holds its query and kv heads and its
MLP rows; o_proj and down_proj all-reduce, the vocabulary is split (layers/).

Precision: the residual stream, norms, RoPE and logits stay fp32; only the matmuls (and the KV
cache) use the engine dtype. In fp32 this is exactly HF's arithmetic; in bf16 it keeps the
answers of a small model coherent where a pure-bf16 residual stream drifts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.distributed import TensorParallelGroup, single_rank
from pagedllm.model_executor.backends.attention_metadata import AttentionMetadata
from pagedllm.model_executor.layers.activation import SiluAndMul
from pagedllm.model_executor.layers.attention import PagedAttention
from pagedllm.model_executor.layers.layernorm import RMSNorm
from pagedllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    split_rows,
)
from pagedllm.model_executor.layers.quant_tensor import QuantTensor
from pagedllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from pagedllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from pagedllm.model_executor.models.hf_config import ArchConfig

# checkpoint name fragment -> (fused parameter fragment, shard index)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def kv_head_layout(cfg: ArchConfig, tp: TensorParallelGroup) -> tuple[int, int]:
    """(kv heads this rank holds, the first of them). With more ranks than kv heads, each kv
    head is replicated on the ranks whose query heads read it, as vLLM does."""
    if tp.world_size <= cfg.num_kv_heads:
        local = tp.shard(cfg.num_kv_heads, "the number of kv heads")
        return local, tp.rank * local
    return 1, tp.rank * cfg.num_kv_heads // tp.world_size


def check_tensor_parallel(cfg: ArchConfig, world_size: int) -> None:
    """A ValueError naming the model's sizes when ``world_size`` ranks cannot split it."""
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    kv_ok = kv % world_size == 0 if world_size <= kv else world_size % kv == 0
    if heads % world_size or not kv_ok:
        raise ValueError(
            f"--tensor-parallel-size {world_size} cannot split this model's {heads} attention "
            f"heads and {kv} kv heads: it must divide the attention heads and either divide "
            f"the kv heads or be a multiple of them"
        )
    if cfg.intermediate_size % world_size:
        raise ValueError(
            f"--tensor-parallel-size {world_size} does not divide the MLP's intermediate size "
            f"{cfg.intermediate_size}"
        )


def layer_window(cfg: ArchConfig, layer: int) -> int | None:
    """The sliding window of ``layer``: the model's, on the layers ``layer_types`` marks
    sliding (Qwen2's first max_window_layers are global), on every layer without them."""
    if not cfg.sliding_window:
        return None
    if cfg.layer_types and cfg.layer_types[layer] != "sliding_attention":
        return None
    return cfg.sliding_window


def kv_window(cfg: ArchConfig) -> int | None:
    """The window every layer attends within (None: some layer reads the whole sequence): the
    KV cache may free what lies behind it."""
    windows = {layer_window(cfg, i) for i in range(cfg.num_layers)}
    return windows.pop() if len(windows) == 1 else None


class LlamaAttention(nn.Module):
    def __init__(
        self,
        cfg: ArchConfig,
        rotary: RotaryEmbedding,
        tp: TensorParallelGroup,
        window: int | None = None,
    ) -> None:
        super().__init__()
        d = cfg.head_dim
        self.num_heads = tp.shard(cfg.num_heads, "the number of attention heads")
        self.num_kv_heads, first_kv = kv_head_layout(cfg, tp)
        self.head_dim = d
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        self.scale = d**-0.5
        kv_rows = (cfg.num_kv_heads * d, first_kv * d, self.kv_size)
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size,
            [(cfg.num_heads * d, tp.rank * self.q_size, self.q_size), kv_rows, kv_rows],
            bias=cfg.qkv_bias,
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, cfg.o_bias, tp)
        self.rotary = rotary
        self.attn = PagedAttention(self.scale, window)

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
    def __init__(self, cfg: ArchConfig, tp: TensorParallelGroup) -> None:
        super().__init__()
        rows = split_rows(cfg.intermediate_size, tp, "the MLP's intermediate size")
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [rows, rows], bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: ArchConfig, rotary: RotaryEmbedding, tp: TensorParallelGroup, layer: int
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, tp, layer_window(cfg, layer))
        self.mlp = LlamaMLP(cfg, tp)
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
    def __init__(self, cfg: ArchConfig, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, rotary, tp, i) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids).float(), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        return self.norm.add_and_norm(residual, hidden, torch.float32)


class LlamaForCausalLM(nn.Module):
    check_tensor_parallel = staticmethod(check_tensor_parallel)
    kv_window = staticmethod(kv_window)
    compute_dtype = torch.float32  # the matmul dtype, set by the model runner
    packed_modules_mapping = PACKED_MODULES  # also how LoRA adapters' names map (lora.py)

    def __init__(self, cfg: ArchConfig, tp: TensorParallelGroup | None = None) -> None:
        """``tp``: this rank of the tensor-parallel group the weights are split over (heads,
        MLP rows, vocabulary); by default one rank holding everything."""
        super().__init__()
        tp = tp or single_rank()
        check_tensor_parallel(cfg, tp.world_size)
        self.config = cfg
        self.num_kv_heads = kv_head_layout(cfg, tp)[0]  # this rank's, in its KV cache
        self.model = LlamaModel(cfg, tp)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """-> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the lm_head's dtype from the fp32 final hidden state, on rank 0 (None on the
        other tensor-parallel ranks). Left unwidened: greedy decoding takes the argmax of bf16
        logits as they are (exact), the sampler widens the rest to fp32 (a [B, V] fp32 copy was
        4 ms of a 110 ms decode step at B=160)."""
        if self.lm_head.qweight is not None:  # from the blocks, in the matmuls' dtype
            return self.lm_head.logits(hidden.to(self.compute_dtype))
        weight = self.lm_head.weight
        return self.lm_head.logits(
            hidden if weight.dtype == hidden.dtype else hidden.to(weight.dtype)
        )

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
            module_name, _, _ = target.rpartition(".")
            module = modules[module_name]
            if shard is None and hasattr(module, "load_weight"):  # split across ranks
                module.load_weight(param, tensor)
                loaded.add(target)
            elif shard is None:
                if param.shape != tensor.shape:
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}"
                    )
                if isinstance(tensor, QuantTensor):
                    module.load_quantized(param, tensor)
                else:
                    param.data.copy_(tensor)
                loaded.add(target)
            else:
                module.load_shard(param, tensor, shard)
                loaded.add(f"{target}#{shard}")
        self._check_all_loaded(params, modules, loaded)

    def _check_all_loaded(self, params, modules, loaded: set[str]) -> None:
        missing = []
        for name in params:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            module_name, _, _ = name.rpartition(".")
            module = modules[module_name]
            if isinstance(module, ColumnParallelLinear):
                missing += [
                    f"{name}#{i}" for i in range(len(module.shards)) if f"{name}#{i}" not in loaded
                ]
            elif name not in loaded:
                missing.append(name)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:8]}")
