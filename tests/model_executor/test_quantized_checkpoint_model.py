"""AWQ / GPTQ / compressed-tensors checkpoints of tiny random models: the quantized layers stay
packed (4/8-bit affine groups, no dense copy) and the model computes what transformers
computes from the weights those codes decode to, through the real scheduler and KV cache, on
every backend (the torch backend decodes them once at load)."""

from __future__ import annotations

import pytest

from pagedllm.model_executor.layers.linear import Linear
from pagedllm.model_executor.layers.quant_tensor import AffineType
from tests.quantized_checkpoints import write_quantized_checkpoint
from tests.utils import (
    backend_names,
    check_logits_parity,
    load_hf_model,
    load_runner,
    make_tiny_model_dir,
    make_tokenizer,
)

# (method, bits, group, symmetric, act order); hidden 64, intermediate 128 (g128: 256, 512)
FORMATS = {
    "awq_g32": ("awq", 4, 32, False, False),
    "awq_g128": ("awq", 4, 128, False, False),
    "gptq4_g32_act_order": ("gptq", 4, 32, False, True),
    "gptq8_g64": ("gptq", 8, 64, True, False),
    "ct_int4_g32_sym": ("compressed-tensors", 4, 32, True, False),
    "ct_int4_g64_asym": ("compressed-tensors", 4, 64, False, False),
    "ct_int8_channel": ("compressed-tensors", 8, -1, True, False),
}


@pytest.fixture(scope="module", params=list(FORMATS))
def checkpoint_and_reference(request, tmp_path_factory):
    """(a quantized checkpoint dir, an HF dir holding exactly the weights its codes decode to)."""
    method, bits, group, sym, act_order = FORMATS[request.param]
    arch = "qwen2" if method == "gptq" else "llama"  # Qwen2: q/k/v biases beside the codes
    out = tmp_path_factory.mktemp(request.param)
    wide = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64} if group == 128 else {}
    model = load_hf_model(make_tiny_model_dir(out / "dense", arch, **wide))
    ckpt = str(out / "quantized")
    write_quantized_checkpoint(model, ckpt, method, bits, group, sym, act_order)
    make_tokenizer(ckpt)
    ref_dir = str(out / "reference")
    model.save_pretrained(ref_dir)
    make_tokenizer(ref_dir)
    return ckpt, ref_dir, FORMATS[request.param]


@pytest.fixture(params=backend_names())
def backend(request):
    return request.param


@pytest.mark.parametrize(
    "block_size,max_batched", [(16, 4096), (5, 24)], ids=["bs16", "bs5-chunked"]
)
def test_logits_match_transformers_on_decoded_weights(
    checkpoint_and_reference, backend, block_size, max_batched
):
    ckpt, ref_dir, (method, bits, group, _, act_order) = checkpoint_and_reference
    runner = load_runner(ckpt, backend, block_size)
    assert runner.quantization == method
    linears = [m for m in runner.model.modules() if isinstance(m, Linear)]
    projections = [m for m in linears if m is not runner.model.lm_head]
    if backend == "torch":  # no kernel for packed groups: decoded once at load
        assert all(m.qweight is None for m in linears)
    else:  # every projection packed, no dense copy; the lm_head left dense
        assert all(m.qweight is not None and m.weight.numel() == 0 for m in projections)
        kinds = {AffineType(part.qtype) for m in projections for part in m.qweight}
        assert {k.bits for k in kinds} == {bits}
        has_perm = any(part.perm is not None for m in projections for part in m.qweight)
        assert has_perm == act_order
    check_logits_parity(
        lambda out: runner.forward_logits(out, all_positions=True), ref_dir, block_size, max_batched
    )
