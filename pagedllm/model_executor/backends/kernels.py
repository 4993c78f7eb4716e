"""The small per-token kernels every layer needs: RMSNorm (with the residual add fused in),
RoPE, SiLU-and-mul, the sampler's row argmax, and the grammar masks of structured outputs.
TorchKernels is the portable reference; NativeKernels runs one ISA's C++ kernels, falling back
per call only for layouts they do not take (non-contiguous views)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.model_executor.ops.native import NativeOps


class TorchKernels:
    name = "torch"

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """In fp32 whatever x's dtype (HF Llama's arithmetic), cast to ``out_dtype``."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return (weight * x.to(dtype)).to(out_dtype)

    def add_rms_norm(
        self,
        residual: torch.Tensor,
        delta: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """``residual += delta`` in place (fp32), then the norm of the new residual."""
        residual.add_(delta.float())
        return self.rms_norm(residual, weight, eps, out_dtype)

    def rotary(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's rotate_half layout; q: [T, Hq, D], k: [T, Hk, D]."""
        c = cos[positions].unsqueeze(1)
        s = sin[positions].unsqueeze(1)
        return _rotate(q, c, s), _rotate(k, c, s)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, 2 * I] (gate | up) -> [T, I]."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def gelu_tanh_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, 2 * I] (gate | up) -> [T, I], GELU's tanh approximation on the gate."""
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.max(dim=-1).indices  # faster than argmax on CPU; same ties

    def argmax_gap_rows(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (argmax, best minus runner-up in fp32) per row."""
        ids = logits.max(dim=-1).indices
        top2 = logits.topk(2, dim=-1).values.float()
        return ids, top2[:, 0] - top2[:, 1]

    def apply_token_bitmask(
        self, logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor
    ) -> None:
        """Structured outputs: ``logits[rows[i], t] = -inf`` where bit t of ``bitmask[i]``
        (word t // 32, int32) is clear, in place; bits past the logits' width are ignored."""
        shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
        allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, : logits.shape[1]]
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))

    def lora_pack(self, a: torch.Tensor, bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layout lora_apply wants for a step's stacked adapters (here: as they are)."""
        return a, bt

    def lora_apply(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        slots: torch.Tensor,
        a: torch.Tensor,
        bt: torch.Tensor,
        bounds: list[int],
    ) -> None:
        """Multi-LoRA, in place: each token's own adapter's ``y += (x A^T) B^T`` (layout in
        ops/csrc/generic/lora.cpp); tokens of slot -1 untouched. fp32 sums."""
        rank = bt.shape[1]
        for slot in slots.unique().tolist():
            if slot < 0:
                continue
            rows = (slots == slot).nonzero().squeeze(1)
            t = x.index_select(0, rows).float() @ a[slot].float().t()
            for k in range(len(bounds) - 1):
                lo, hi = bounds[k], bounds[k + 1]
                delta = t[:, k * rank : (k + 1) * rank] @ bt[slot, :, lo:hi].float()
                y[:, lo:hi].index_add_(0, rows, delta.to(y.dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class NativeKernels(TorchKernels):
    def __init__(self, ops: NativeOps) -> None:
        self.ops = ops
        self.name = ops.isa

    def rms_norm(self, x, weight, eps, out_dtype):
        if x.dtype != torch.float32 or not x.is_contiguous():
            return super().rms_norm(x, weight, eps, out_dtype)
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        self.ops.rms_norm(x, weight, eps, out)
        return out

    def add_rms_norm(self, residual, delta, weight, eps, out_dtype):
        if not delta.is_contiguous():
            return super().add_rms_norm(residual, delta, weight, eps, out_dtype)
        out = torch.empty(residual.shape, dtype=out_dtype, device=residual.device)
        self.ops.fused_add_rms_norm(residual, delta, weight, eps, out)
        return out

    def rotary(self, positions, q, k, cos, sin):
        """Rotates q and k in place."""
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            return super().rotary(positions, q, k, cos, sin)
        self.ops.rotary_embedding(positions, q, k, cos, sin)
        return q, k

    def silu_and_mul(self, x):
        if not x.is_contiguous():
            return super().silu_and_mul(x)
        return self.ops.silu_and_mul(x)

    def argmax_rows(self, logits):
        if logits.stride(-1) != 1:
            return super().argmax_rows(logits)
        return self.ops.argmax_rows(logits)

    def argmax_gap_rows(self, logits):
        if logits.stride(-1) != 1:
            return super().argmax_gap_rows(logits)
        return self.ops.argmax_gap_rows(logits)

    def apply_token_bitmask(self, logits, rows, bitmask):
        if logits.stride(-1) != 1 or logits.device.type != "cpu":
            return super().apply_token_bitmask(logits, rows, bitmask)
        self.ops.apply_token_bitmask(logits, rows.long().contiguous(), bitmask.contiguous())

    def lora_pack(self, a, bt):
        """The kernel's layouts (ops/csrc/generic/lora.cpp): Rt padded to 16, then VNNI pairs
        (bf16 on an AVX512-BF16 build, even ``in``), else A transposed."""
        if a.dtype not in (torch.float32, torch.bfloat16):
            return a, bt  # the torch path's layout
        slots, rt, inn = a.shape
        pad = -rt % 16
        if pad:
            a = torch.cat([a, a.new_zeros(slots, pad, inn)], dim=1)
        r, out = bt.shape[1], bt.shape[2]
        vnni = a.dtype == torch.bfloat16 and self.ops.bf16_pairs
        if vnni and inn % 2 == 0 and r % 2 == 0:
            a = a.view(slots, rt + pad, inn // 2, 2).permute(0, 2, 1, 3).contiguous()
            bt = bt.view(slots, r // 2, 2, out).permute(0, 1, 3, 2).contiguous()
            return a, bt
        return a.transpose(1, 2).contiguous(), bt.contiguous()

    def lora_apply(self, y, x, slots, a, bt, bounds):
        """``a``, ``bt`` as lora_pack made them."""
        if x.dtype not in (torch.float32, torch.bfloat16):
            return super().lora_apply(y, x, slots, a, bt, bounds)
        self.ops.lora_apply(y, x.contiguous(), slots, a, bt, bounds)
