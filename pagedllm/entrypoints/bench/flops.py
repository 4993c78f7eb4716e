"""FLOPs of a Llama-family decoder, to turn tokens/s into a fraction of the machine's GEMM rate.

On CPU a small model's throughput is bounded by matrix-multiply speed; comparing the FLOP rate a
run achieved with the GEMM rate ``benchmarks/gemm_rate.py`` measures says how much headroom an
engine leaves. Counted (multiply-add = 2 FLOPs):

- every processed token runs the layer matmuls: q, k, v, o projections and the gated MLP
  (gate, up, down) -> 2 * body_params;
- each token at context position c attends over c keys: Q.K^T and P.V -> 4 * layers * heads *
  head_dim * c;
- the LM head runs only where a token is sampled -> 2 * vocab * hidden per output token.

Norms, rotary embeddings, softmax and sampling are ignored (well under 1% here).
"""

from __future__ import annotations

from pagedllm.model_executor.models.hf_config import ArchConfig

# ``arch`` below is pagedllm's ArchConfig: the engine's own (``llm.engine.runner.arch``), or
# ``arch_config_from_hf(config)`` for any transformers config.


def layer_params(arch: ArchConfig) -> int:
    """Weights of one decoder layer's matmuls."""
    q_out = arch.num_heads * arch.head_dim
    kv_out = arch.num_kv_heads * arch.head_dim
    attn = arch.hidden_size * (q_out + 2 * kv_out) + q_out * arch.hidden_size
    mlp = 3 * arch.hidden_size * arch.intermediate_size
    return attn + mlp


def body_params(arch: ArchConfig) -> int:
    return arch.num_layers * layer_params(arch)


def lm_head_params(arch: ArchConfig) -> int:
    return arch.vocab_size * arch.hidden_size


def attention_flops(arch: ArchConfig, context_len: int) -> float:
    """Q.K^T and P.V for one query token over ``context_len`` keys, all layers."""
    return 4.0 * arch.num_layers * arch.num_heads * arch.head_dim * context_len


# SmolLM2-135M-Instruct, the embedded default model (its config.json).
SMOLLM2_135M = ArchConfig(
    architecture="LlamaForCausalLM",
    hidden_size=576,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    rope_scaling=None,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    qkv_bias=False,
    o_bias=False,
    mlp_bias=False,
    sliding_window=None,
)


def flops_per_token(arch: ArchConfig, context_len: int) -> float:
    """One decode step of one sequence at ``context_len`` tokens (layers + attention + LM head)."""
    matmul = 2.0 * (body_params(arch) + lm_head_params(arch))
    return matmul + attention_flops(arch, context_len)


def request_flops(arch: ArchConfig, prompt_len: int, output_len: int) -> float:
    """All the useful work of one request: a prefill of ``prompt_len`` tokens, then one decode
    step per output token but the last (the last token is sampled, never fed back)."""
    if prompt_len < 1 or output_len < 1:
        raise ValueError(
            f"prompt_len and output_len must be positive, got {prompt_len}, {output_len}"
        )
    processed = prompt_len + output_len - 1  # tokens run through the layers
    # Token at position i (1-based) attends over i keys: sum_{i=1..n} i = n(n+1)/2.
    attention = attention_flops(arch, 1) * processed * (processed + 1) / 2
    return 2.0 * body_params(arch) * processed + 2.0 * lm_head_params(arch) * output_len + attention
