"""quant_linear / quant_dequantize on every ISA this machine runs, for every format: GGUF blocks
(--quantization gguf) against gguf-py's reference decoder, affine groups (AWQ/GPTQ/
compressed-tensors) against QuantTensor's Python decoder. Every format decodes bit for bit,
products match fp32 matmuls of the decoded weights, and a row's result does not depend on the
other rows of the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from pagedllm.model_executor.layers.quant_tensor import KERNEL_TYPES, AffineType, affine_tensor
from tests.model_executor.loader.loader_tiny_models import random_blocks

GGUF_TYPES = sorted(KERNEL_TYPES, key=int)
TYPES = GGUF_TYPES + list(AffineType)


def _weights(qtype, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [rows, row_bytes], the reference decoding of them in fp32 [rows, cols])."""
    if qtype in AffineType:
        gen = torch.Generator().manual_seed(seed)
        groups = cols // qtype.group
        codes = torch.randint(0, 1 << qtype.bits, (rows, cols), generator=gen)
        # fp16 scales, as AWQ/GPTQ store them: q s is exact in fp32, so the kernel's FMA and
        # the Python decoder's multiply-then-add round alike
        scales = (torch.rand(rows, groups, generator=gen) * 0.1 + 0.01).half().float()
        zeros = torch.randint(0, 1 << qtype.bits, (rows, groups), generator=gen).float()
        t = affine_tensor(codes.to(torch.uint8), scales, -zeros * scales, qtype.bits, "w")
        assert t.qtype == qtype
        return t.data, t.dequantize()
    blocks = random_blocks(qtype, rows, cols, np.random.default_rng(seed))
    ref = dequantize(blocks, qtype).reshape(rows, cols).astype(np.float32)
    return torch.from_numpy(blocks), torch.from_numpy(ref)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_gguf_py_bit_for_bit(ops, qtype):
    w, ref = _weights(qtype, 37, 512)
    out = torch.empty(37, 512)
    ops.quant_dequantize(w, int(qtype), out)
    assert torch.equal(out, ref)
    out16 = torch.empty(37, 512, dtype=torch.bfloat16)
    ops.quant_dequantize(w, int(qtype), out16)
    assert torch.equal(out16, ref.bfloat16())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 17, 33, 130, 300])
def test_linear_matches_matmul_of_decoded_weights(ops, qtype, m):
    """Every row count (each kernel path: per-row decoding, 64-row panels past 32 rows)."""
    w, ref = _weights(qtype, 70, 768, seed=m)
    x = torch.randn(m, 768, generator=torch.Generator().manual_seed(m))
    y = ops.quant_linear(x, w, int(qtype))
    assert y.dtype == torch.float32 and y.shape == (m, 70)
    # fp32 sums in some order: within a few ulps of the sum of |products| of the exact result
    exact = x.double() @ ref.double().T
    bound = 4e-7 * (x.abs().double() @ ref.abs().double().T)
    assert ((y.double() - exact).abs() <= bound).all()
    # bf16 x: the weights as a bf16 model holds them (rounded to bf16), fp32 sums, bf16 out
    yb = ops.quant_linear(x.bfloat16(), w, int(qtype))
    assert yb.dtype == torch.bfloat16
    refb = x.bfloat16().float() @ ref.bfloat16().float().T
    scale = refb.abs().max().item()
    torch.testing.assert_close(yb.float(), refb, rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.parametrize(
    "qtype", [Q.Q4_1, Q.Q4_K, Q.F16, AffineType.A4G128, AffineType.A8G32], ids=lambda t: t.name
)
def test_each_row_is_batch_invariant(ops, qtype):
    """--deterministic (batch_invariant): a row's bits alone == in any batch, fp32 and bf16."""
    w, _ = _weights(qtype, 96, 512)
    for x in (torch.randn(70, 512), torch.randn(70, 512).bfloat16()):
        alone = torch.cat([ops.quant_linear(x[i : i + 1], w, int(qtype), True) for i in range(70)])
        for m in (3, 8, 13, 17, 40, 70):
            assert torch.equal(ops.quant_linear(x[:m], w, int(qtype), True), alone[:m])


def test_bad_shapes_and_types_are_refused(ops):
    w, _ = _weights(Q.Q4_0, 4, 64)
    with pytest.raises(RuntimeError, match="multiple of the block"):
        ops.quant_linear(torch.randn(1, 48), w[:, :27].contiguous(), int(Q.Q4_0))
    with pytest.raises(RuntimeError, match="does not hold"):
        ops.quant_linear(torch.randn(1, 96), w, int(Q.Q4_0))
    with pytest.raises(RuntimeError, match="no kernel"):
        ops.quant_linear(torch.randn(1, 64), w, int(Q.Q2_K))


def test_block_sizes_agree_with_gguf_py():
    """The kernel's block layouts are ggml's (the sizes gguf-py knows)."""
    for qtype in GGUF_TYPES:
        bw, bb = GGML_QUANT_SIZES[qtype]
        blocks = random_blocks(qtype, 2, 256, np.random.default_rng(0))
        assert blocks.shape == (2, 256 // bw * bb)


@pytest.mark.parametrize("m", [1, 7, 50])
def test_perm_gathers_x_columns_first(ops, m):
    """GPTQ act order: with perm, the kernel multiplies x[:, perm] (every path, both dtypes)."""
    w, _ = _weights(AffineType.A4G32, 40, 256)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(m))
    for x in (torch.randn(m, 256), torch.randn(m, 256).bfloat16()):
        for invariant in (False, True):
            got = ops.quant_linear(x, w, int(AffineType.A4G32), invariant, perm)
            want = ops.quant_linear(x[:, perm].contiguous(), w, int(AffineType.A4G32), invariant)
            assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="perm"):
        ops.quant_linear(torch.randn(2, 256), w, int(AffineType.A4G32), False, perm[:100])


@pytest.mark.parametrize("bf16_native", [True, False])
def test_bf16_steps_run_in_fp32_where_bf16_is_emulated(ops, monkeypatch, bf16_native):
    """Without bf16 dot products the backend widens bf16 x (exactly) and runs the kernel in fp32,
    whose big steps then use torch's fp32 GEMM, not its emulated bf16 one; with them, bf16."""
    from pagedllm.model_executor.backends import linear as linear_backend

    monkeypatch.setattr(linear_backend, "has_native_bf16", lambda: bf16_native)
    w, _ = _weights(Q.Q4_1, 64, 512)
    part = type("Part", (), {"data": w, "qtype": Q.Q4_1, "perm": None})()
    seen = []
    kernel = ops.quant_linear
    monkeypatch.setattr(ops, "quant_linear", lambda x, *a: seen.append(x.dtype) or kernel(x, *a))
    backend = linear_backend.NativeLinearBackend(ops)
    x = torch.randn(48, 512).bfloat16()
    y = backend.quantized_matmul((part,), x)
    assert y.dtype == torch.bfloat16
    if bf16_native:
        assert seen == [torch.bfloat16]
    else:
        assert seen == [torch.float32]
        assert torch.equal(y, kernel(x.float(), w, int(Q.Q4_1), False, None).bfloat16())
