"""--quantization gguf: a model whose matmul weights stay in ggml blocks computes what
transformers computes from those blocks decoded to fp32, through the real scheduler and KV
cache, on every backend (the torch backend decodes them once at load). Every kernel format is
in some layer, stacked q|k|v mixes formats, and the vocabulary table is quantized (tied or
not)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM

from pagedllm.model_executor.layers.linear import Linear
from pagedllm.model_executor.layers.quant_tensor import QuantTensor
from tests.model_executor.loader.loader_tiny_models import write_gguf
from tests.utils import (
    backend_names,
    check_logits_parity,
    load_runner,
    make_tokenizer,
    tiny_config,
)

SMALL_BLOCKS = {
    "token_embd": Q.Q8_0,
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q5_0,
    "attn_v": Q.F16,
    "attn_output": Q.Q4_1,
    "ffn_gate": Q.Q8_0,
    "ffn_up": Q.F32,
    "ffn_down": Q.Q4_1,
    "output": Q.Q4_0,
}
K_QUANTS = {  # 256-weight super-blocks: rows of 256 and 512
    "token_embd": Q.Q6_K,
    "attn_q": Q.Q4_K,
    "attn_k": Q.Q6_K,
    "attn_v": Q.Q8_0,
    "attn_output": Q.Q4_K,
    "ffn_gate": Q.Q4_K,
    "ffn_up": Q.Q5_0,
    "ffn_down": Q.Q6_K,
    "output": Q.Q4_K,
}
VARIANTS = {
    "llama": ("llama", SMALL_BLOCKS, {}),
    "llama_tied": ("llama", SMALL_BLOCKS, {"tie_word_embeddings": True}),
    "qwen2_biases": ("qwen2", SMALL_BLOCKS, {}),
    "llama_kquants": (
        "llama",
        K_QUANTS,
        {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64},
    ),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def gguf_and_reference(request, tmp_path_factory):
    """(a GGUF file, an HF directory holding exactly the weights its blocks decode to)."""
    arch, plan, overrides = VARIANTS[request.param]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    out = tmp_path_factory.mktemp(request.param)
    path = str(out / "tiny.gguf")
    expected = write_gguf(model, path, plan)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
    ref_dir = str(out / "reference")
    model.save_pretrained(ref_dir)
    make_tokenizer(ref_dir)
    return path, ref_dir


@pytest.fixture(params=backend_names())
def backend(request):
    return request.param


@pytest.mark.parametrize(
    "block_size,max_batched", [(16, 4096), (5, 24)], ids=["bs16", "bs5-chunked"]
)
def test_logits_match_transformers_on_decoded_blocks(
    gguf_and_reference, backend, block_size, max_batched
):
    path, ref_dir = gguf_and_reference
    runner = load_runner(path, backend, block_size, "gguf")
    linears = [m for m in runner.model.modules() if isinstance(m, Linear)]
    if backend == "torch":  # no kernel for blocks: decoded once at load
        assert all(m.qweight is None for m in linears)
        assert all(m.weight.numel() or m.packed_weight is not None for m in linears)
    else:  # every matmul weight kept in its blocks, no dense copy
        assert all(m.qweight is not None and m.weight.numel() == 0 for m in linears)
        assert runner.model.model.embed_tokens.qweight is not None
    check_logits_parity(
        lambda out: runner.forward_logits(out, all_positions=True), ref_dir, block_size, max_batched
    )


def test_columns_split_only_on_block_boundaries():
    rows = torch.zeros(4, 2 * 20, dtype=torch.uint8)  # Q4_1: 20 bytes per 32 weights
    t = QuantTensor(Q.Q4_1, rows, 64, "blk.0.ffn_down.weight")
    assert t.columns(32, 32).data.shape == (4, 20)
    with pytest.raises(ValueError, match="blk.0.ffn_down.weight.*blocks of 32"):
        t.columns(16, 48)


def test_padded_vocab_rows_decode_to_zero():
    t = QuantTensor(Q.Q8_0, torch.from_numpy(np.full((3, 34), 7, np.uint8)), 32)
    padded = t.padded_rows(5)
    assert padded.shape == (5, 32)
    assert torch.equal(padded.dequantize()[3:], torch.zeros(2, 32))
