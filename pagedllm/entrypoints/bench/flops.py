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

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TransformerShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> TransformerShape:
        """From a transformers config or pagedllm's ArchConfig (either set of names)."""
        hidden = config.hidden_size
        num_heads = _first(config, "num_heads", "num_attention_heads")
        return cls(
            hidden_size=hidden,
            num_layers=_first(config, "num_layers", "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=_first(config, "num_kv_heads", "num_key_value_heads", default=num_heads),
            head_dim=_first(config, "head_dim", default=hidden // num_heads),
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
        )

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's matmuls."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        attn = self.hidden_size * (q_out + 2 * kv_out) + q_out * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return attn + mlp

    @property
    def body_params(self) -> int:
        return self.num_layers * self.layer_params

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def attention_flops(self, context_len: int) -> float:
        """Q.K^T and P.V for one query token over ``context_len`` keys, all layers."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim * context_len


# SmolLM2-135M-Instruct, the embedded default model (its config.json).
SMOLLM2_135M = TransformerShape(
    hidden_size=576,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
)


def flops_per_token(shape: TransformerShape, context_len: int) -> float:
    """One decode step of one sequence at ``context_len`` tokens (layers + attention + LM head)."""
    matmul = 2.0 * (shape.body_params + shape.lm_head_params)
    return matmul + shape.attention_flops(context_len)


def request_flops(shape: TransformerShape, prompt_len: int, output_len: int) -> float:
    """All the useful work of one request: a prefill of ``prompt_len`` tokens, then one decode
    step per output token but the last (the last token is sampled, never fed back)."""
    if prompt_len < 1 or output_len < 1:
        raise ValueError(
            f"prompt_len and output_len must be positive, got {prompt_len}, {output_len}"
        )
    processed = prompt_len + output_len - 1  # tokens run through the layers
    # Token at position i (1-based) attends over i keys: sum_{i=1..n} i = n(n+1)/2.
    attention = shape.attention_flops(1) * processed * (processed + 1) / 2
    return 2.0 * shape.body_params * processed + 2.0 * shape.lm_head_params * output_len + attention


def _first(config: Any, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    if default is None:
        raise ValueError(f"the model config has none of {names}")
    return default
