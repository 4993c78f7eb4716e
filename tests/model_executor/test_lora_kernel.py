"""The native lora_apply kernel (every ISA this CPU runs) against the torch reference, and the
reference against plain per-token matmuls: fp32 and bf16, fused (3 shards) and plain layers,
tokens of the base model (slot -1) untouched, widths with a vector tail."""

from __future__ import annotations

import pytest
import torch

from pagedllm.model_executor.backends.kernels import TorchKernels


def _case(dtype, bounds, n=37, inn=72, slots_count=3, rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = bounds[-1]
    shards = len(bounds) - 1
    x = torch.randn(n, inn, generator=g).to(dtype)
    y = torch.randn(n, out, generator=g).to(dtype)
    a = (torch.randn(slots_count, shards * rank, inn, generator=g) * 0.3).to(dtype)
    bt = (torch.randn(slots_count, rank, out, generator=g) * 0.3).to(dtype)
    slots = torch.randint(-1, slots_count, (n,), generator=g)
    return y, x, slots, a, bt


def _per_token(y, x, slots, a, bt, bounds, round_t=False):
    """Each token alone: y + (x A_s^T) B_s^T, shard by shard, in fp32 (``round_t``: x A^T
    rounded to bf16 first)."""
    want = y.float().clone()
    rank = bt.shape[1]
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        t = a[s].float() @ x[i].float()
        if round_t:
            t = t.bfloat16().float()
        for k in range(len(bounds) - 1):
            lo, hi = bounds[k], bounds[k + 1]
            want[i, lo:hi] += t[k * rank : (k + 1) * rank] @ bt[s, :, lo:hi].float()
    return want


BOUNDS = [[0, 72, 96, 120], [0, 53]]  # fused q/k/v with a tail; one projection, odd width


@pytest.mark.parametrize("bounds", BOUNDS)
def test_torch_reference_is_per_token_lora(bounds):
    y, x, slots, a, bt = _case(torch.float32, bounds)
    want = _per_token(y, x, slots, a, bt, bounds)
    TorchKernels().lora_apply(y, x, slots, a, bt, bounds)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bounds", BOUNDS)
def test_native_matches_reference(ops, dtype, bounds):
    """In the layout NativeKernels.lora_pack makes for this ISA and dtype (VNNI pairs for bf16
    on AVX512-BF16 builds, A transposed otherwise)."""
    from pagedllm.model_executor.backends.kernels import NativeKernels

    y, x, slots, a, bt = _case(dtype, bounds, seed=1)
    base = y.clone()
    want = _per_token(y, x, slots, a, bt, bounds)
    if dtype == torch.bfloat16:  # a bf16 matmul's x A^T is rounded to bf16 before B
        want = _per_token(y, x, slots, a, bt, bounds, round_t=ops.bf16_pairs)
    kernels = NativeKernels(ops)
    kernels.lora_apply(y, x, slots, *kernels.lora_pack(a, bt), bounds)
    untouched = slots < 0
    assert untouched.any() and torch.equal(y[untouched], base[untouched])
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: y rounded once (~3 digits)
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol)


def test_native_rejects_bad_slots(ops):
    from pagedllm.model_executor.backends.kernels import NativeKernels

    y, x, slots, a, bt = _case(torch.float32, [0, 53])
    slots[0] = 7
    kernels = NativeKernels(ops)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.lora_apply(y, x, slots, *kernels.lora_pack(a, bt), [0, 53])
