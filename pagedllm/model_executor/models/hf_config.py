"""ArchConfig: the architecture numbers a decoder needs, read off a transformers config
(transformers 4.x ``rope_theta``/``rope_scaling`` and 5.x ``rope_parameters`` alike)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    # Encoders (BERT): learned absolute positions, token types, LayerNorm, GELU.
    model_type: str = ""
    hidden_act: str = "silu"
    type_vocab_size: int = 0
    # Matryoshka embeddings (config.json's is_matryoshka / matryoshka_dimensions).
    matryoshka_dimensions: tuple[int, ...] | None = None
    # Models mixing sliding-window and global layers (Gemma 3): each layer's kind
    # ("sliding_attention" / "full_attention"), the sliding layers' RoPE base, and the
    # attention scale's denominator (query_pre_attn_scalar ** -0.5; None: head_dim).
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None


def arch_config_from_hf(hf_config: Any) -> ArchConfig:
    archs = getattr(hf_config, "architectures", None) or []
    arch = archs[0] if archs else _arch_from_model_type(getattr(hf_config, "model_type", ""))
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    rope_params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_local_theta = None
    if "full_attention" in rope_params:  # per layer type (Gemma 3): the global layers' here
        local = rope_params.get("sliding_attention") or {}
        rope_local_theta = float(local.get("rope_theta", 10000.0))
        rope_params = dict(rope_params["full_attention"])
    rope_theta = rope_params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_scaling = getattr(hf_config, "rope_scaling", None)
    if rope_params.get("rope_type", "default") != "default":
        rope_scaling = rope_params
    is_qwen2 = arch.startswith("Qwen2")
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    sliding_window = None
    if getattr(hf_config, "use_sliding_window", True) is not False:
        sliding_window = getattr(hf_config, "sliding_window", None)
    return ArchConfig(
        architecture=arch,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        intermediate_size=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        rms_norm_eps=float(
            getattr(hf_config, "rms_norm_eps", None) or getattr(hf_config, "layer_norm_eps", 1e-6)
        ),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=getattr(hf_config, "max_position_embeddings", 2048),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=True if is_qwen2 else attention_bias,
        o_bias=False if is_qwen2 else attention_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        sliding_window=sliding_window,
        model_type=getattr(hf_config, "model_type", "") or "",
        hidden_act=(
            getattr(hf_config, "hidden_act", None)
            or getattr(hf_config, "hidden_activation", None)
            or "silu"
        ),
        type_vocab_size=getattr(hf_config, "type_vocab_size", 0) or 0,
        matryoshka_dimensions=_matryoshka_dimensions(hf_config),
        layer_types=tuple(getattr(hf_config, "layer_types", None) or ()) or None,
        rope_local_theta=rope_local_theta,
        query_pre_attn_scalar=getattr(hf_config, "query_pre_attn_scalar", None),
    )


def _matryoshka_dimensions(hf_config: Any) -> tuple[int, ...] | None:
    dims = getattr(hf_config, "matryoshka_dimensions", None)
    if dims:
        return tuple(int(d) for d in dims)
    if getattr(hf_config, "is_matryoshka", False):
        return tuple(range(1, hf_config.hidden_size + 1))
    return None


def _arch_from_model_type(model_type: str) -> str:
    return {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "bert": "BertModel",
        "gemma3_text": "Gemma3ForCausalLM",
    }.get(model_type, model_type)
