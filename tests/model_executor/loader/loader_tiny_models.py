"""Test helpers: tiny random HF models and GGUF files written from them the way llama.cpp does."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2ForCausalLM,
)

from pagedllm.model_executor.loader.gguf_weights import unpermute_qk
from tests.utils import tiny_config

Q = GGMLQuantizationType

# HF parameter leaf -> llama.cpp tensor name
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}

# A mix of what real GGUF files hold; Q4/Q8 blocks need rows that are multiples of 32 long.
LLAMA_QUANT_PLAN: Mapping[str, GGMLQuantizationType] = {
    "token_embd": Q.Q8_0,
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q8_0,
    "attn_v": Q.F16,
    "attn_output": Q.Q4_1,
    "ffn_gate": Q.Q4_0,
    "ffn_up": Q.Q8_0,
    "ffn_down": Q.Q4_1,
    "output": Q.F16,
}


# Where each format keeps its fp16 scales (byte offsets in a block), for random_blocks.
_HALF_FIELDS = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q8_0: (0,),
    Q.Q4_K: (0, 2),
    Q.Q6_K: (208,),
}
# fp16 scales that keep weights within ~0.5 for each format's integer range.
_HALF_SCALE = {Q.Q4_K: 3e-4, Q.Q6_K: 5e-5}


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, rng) -> np.ndarray:
    """uint8 [rows, row_bytes]: random ggml blocks of ``qtype`` (any bit pattern is a valid
    block once its fp16 scales are finite): the K-quants, which gguf-py cannot quantize into,
    get weights this way; unquantized types are random values stored as that type."""
    if qtype in (Q.F32, Q.F16, Q.BF16):
        values = rng.standard_normal((rows, cols)).astype(np.float32) * 0.5
        if qtype == Q.BF16:
            return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return values.astype(np.float32 if qtype == Q.F32 else np.float16).view(np.uint8)
    bw, bb = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // bw, bb), dtype=np.uint8)
    scale = _HALF_SCALE.get(qtype, 0.05)
    for off in _HALF_FIELDS[qtype]:
        halves = rng.uniform(-scale, scale, size=(rows, cols // bw)).astype(np.float16)
        raw[:, :, off : off + 2] = halves.view(np.uint8).reshape(rows, cols // bw, 2)
    return raw.reshape(rows, -1)


def tiny_llama(tie_word_embeddings: bool = False, attention_bias: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_config(
        "llama",
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=attention_bias,
    )
    return _randomized(LlamaForCausalLM(config))


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(1)
    config = tiny_config(
        "qwen2", max_position_embeddings=256, rope_theta=1000000.0, tie_word_embeddings=True
    )
    return _randomized(Qwen2ForCausalLM(config))


def _randomized(model: PreTrainedModel) -> PreTrainedModel:
    """Random values everywhere (HF inits norms to 1 and biases to 0, which would hide bugs)."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    return model.eval()


def gguf_name(hf_name: str) -> str:
    stem, _, kind = hf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    _, _, layer, leaf = stem.split(".", 3)
    return f"blk.{layer}.{_BLOCK_NAMES[leaf]}.{kind}"


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (the inverse of unpermute_qk)."""
    w = weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
    return w.swapaxes(1, 2).reshape(weights.shape)


def write_gguf(
    model: PreTrainedModel,
    path: str,
    quant_plan: Mapping[str, GGMLQuantizationType] | None = None,
    name: str = "tiny",
) -> dict[str, np.ndarray]:
    """Write ``model`` as llama.cpp would; return the exact float32 values a loader must produce.

    Expected values are what gguf-py dequantizes from the written blocks, with the q/k rows put
    back in HF order, so a loader can be checked bit for bit.
    """
    config = model.config
    arch = {"llama": "llama", "qwen2": "qwen2"}[config.model_type]
    permuted = arch == "llama"
    plan = quant_plan or {}
    writer = GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(1)

    expected: dict[str, np.ndarray] = {}
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        name_gguf = gguf_name(hf_name)
        values = tensor.detach().float().numpy()
        heads = _permute_heads(name_gguf, config) if permuted else None
        if heads is not None:
            values = permute_qk(values, heads)
        leaf = name_gguf.split(".")[-2]
        qtype = plan.get(leaf, Q.F32) if values.ndim == 2 else Q.F32
        if qtype == Q.F32:
            writer.add_tensor(name_gguf, np.ascontiguousarray(values))
            stored = values
        elif qtype == Q.F16:
            half = values.astype(np.float16)
            writer.add_tensor(name_gguf, half)
            stored = half.astype(np.float32)
        else:
            # gguf-py cannot quantize into K-quants: those tensors get random blocks (the
            # expected values are what they decode to, not the model's)
            blocks = (
                random_blocks(qtype, *values.shape, np.random.default_rng(len(expected)))
                if qtype in (Q.Q4_K, Q.Q6_K)
                else quantize(values, qtype)
            )
            writer.add_tensor(name_gguf, blocks, raw_dtype=qtype)
            stored = dequantize(blocks, qtype).astype(np.float32).reshape(values.shape)
        expected[hf_name] = unpermute_qk(stored, heads) if heads is not None else stored
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert os.path.getsize(path) > 0
    return expected


def _permute_heads(name: str, config: LlamaConfig) -> int | None:
    if ".attn_q." in name:
        return int(config.num_attention_heads)
    if ".attn_k." in name:
        return int(config.num_key_value_heads)
    return None
