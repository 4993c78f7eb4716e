"""TorchAttentionBackend: paged attention in plain torch ops, for any device, dtype and head
size (what CUDA runs today, and the CPU reference the native backends are tested against).

KV cache of one layer:

    K: [num_blocks, num_kv_heads, head_dim, block_size]   (transposed per block: the native
    V: [num_blocks, num_kv_heads, block_size, head_dim]    decode kernel scores a block with FMAs)
     slot s = block_id * block_size + offset   (slot_mapping holds one slot per new token)

With ``kv_cache_dtype="bfloat16"`` under an fp32 model the cache is bf16 (rounded to nearest
even on write) while q, the scores and the outputs stay fp32. With ``kv_cache_dtype="int8"``
each (block, kv head) is one int8 record of ``block_size * (head_dim + 4)`` bytes: the values in
the layout above, then one fp32 scale per token (symmetric, max|x| / 127 over the head's
head_dim values); ``int8_views`` splits a record.

Tokens arrive ordered decode requests first, then prefills (input_batch sorts them). Here
decodes gather each sequence's blocks and run one masked SDPA; drafts run as prefill chunks;
each prefill is one SDPA on its fresh K/V, or, when part of its context is already cached
(chunked prefill, prefix hit), on its gathered blocks with a bottom-right causal mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pagedllm.model_executor.backends.attention_metadata import (
    AttentionMetadata,
    DecodeMetadata,
    EncoderMetadata,
)


def int8_views(
    cache: torch.Tensor, head_dim: int, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 cache [NB, H, BS * (D + 4)] -> (values [NB, H, D, BS] if ``transposed`` (K) else
    [NB, H, BS, D] (V), scales [NB, H, BS] fp32), both views of the cache."""
    nb, h, rec = cache.shape
    bs = rec // (head_dim + 4)
    shape = (nb, h, head_dim, bs) if transposed else (nb, h, bs, head_dim)
    return cache[..., : bs * head_dim].view(shape), cache[..., bs * head_dim :].view(torch.float32)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: x ~ q * scale[..., None]."""
    amax = x.float().abs().amax(dim=-1)
    scale = amax / 127
    # A true division, as the native kernel does (``127 / tensor`` multiplies by a reciprocal).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return torch.round(x.float() * inv[..., None]).to(torch.int8), scale


def gather_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    head_dim: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The listed blocks -> K, V as [num_kv_heads, nb * block_size, head_dim] in ``dtype``
    (an int8 cache is dequantized)."""
    if k_cache.dtype == torch.int8:
        kvals, kscales = int8_views(k_cache, head_dim, transposed=True)
        vvals, vscales = int8_views(v_cache, head_dim, transposed=False)
        k = kvals[block_table].float() * kscales[block_table][:, :, None, :]
        v = vvals[block_table].float() * vscales[block_table][..., None]
    else:
        k, v = k_cache[block_table], v_cache[block_table]
    h = k.shape[1]
    k = k.permute(1, 0, 3, 2).reshape(h, -1, head_dim)
    v = v.transpose(0, 1).reshape(h, -1, head_dim)
    return k.to(dtype), v.to(dtype)


class TorchAttentionBackend:
    name = "torch"
    # The decode path gathers blocks under a key mask (input_batch builds it).
    reads_cache_in_place = False
    # Whether forward reads AttentionMetadata.token_rows (every query row as a decode of its
    # own context: the batch-invariant backend) instead of the decode/prefill split.
    per_token_rows = False
    # Query rows of one (sequence, kv head) a verify kernel takes; None: no verify kernel.
    max_verify_rows: int | None = None
    # Whether n-gram drafts are on by default (--speculative-config auto) on this backend: only
    # where checking a draft row costs less than the drafts win.
    drafts_by_default = True

    def supports(self, head_dim: int, block_size: int, int8_cache: bool) -> bool:
        return True

    def can_verify(self, block_size: int, int8_cache: bool) -> bool:
        """Whether decodes with drafts run in the verify kernel (else as prefill chunks)."""
        return False

    def describe(self) -> str:
        return "torch SDPA over gathered blocks"

    # ---- KV writes -----------------------------------------------------------------------------
    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        """Write the K/V rows of ``slots``; rows past them (pad rows) write nothing."""
        k, v = k[: slots.shape[0]], v[: slots.shape[0]]
        if k_cache.dtype == torch.int8:
            (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
            kvals, kscales = int8_views(k_cache, k.shape[-1], transposed=True)
            vvals, vscales = int8_views(v_cache, v.shape[-1], transposed=False)
            block_size = vvals.shape[2]
            blocks, offsets = slots // block_size, slots % block_size
            kvals.permute(0, 3, 1, 2)[blocks, offsets] = kq
            vvals.permute(0, 2, 1, 3)[blocks, offsets] = vq
            kscales.permute(0, 2, 1)[blocks, offsets] = ks
            vscales.permute(0, 2, 1)[blocks, offsets] = vs
            return
        block_size = v_cache.shape[2]
        blocks, offsets = slots // block_size, slots % block_size
        # Both views index as [block, offset, head, dim]; the writes land in the cache tensors.
        k_cache.permute(0, 3, 1, 2)[blocks, offsets] = k.to(k_cache.dtype)
        v_cache.permute(0, 2, 1, 3)[blocks, offsets] = v.to(v_cache.dtype)

    # ---- attention -----------------------------------------------------------------------------
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] (already written to the cache) -> [T, Hq, D].
        ``window``: a sliding-window layer's width (a query at position p sees the keys at
        p - window + 1 .. p); None: every earlier key."""
        if window is not None and window_matters(meta, window):
            return windowed_forward(q, k, v, k_cache, v_cache, meta, scale, window)
        d = meta.decode
        if d is not None and not meta.prefills and d.num_tokens == q.shape[0]:
            # A decode-only step (most of a serving run): the kernel's output as it is, without
            # an output buffer to fill and copy into (three dispatches a layer).
            return self.decode(q, k_cache, v_cache, d, scale)
        out = torch.empty_like(q)
        out[meta.slot_mapping.shape[0] :] = 0  # pad rows, if any
        if meta.decode is not None:
            d = meta.decode
            out[: d.num_tokens] = self.decode(q[: d.num_tokens], k_cache, v_cache, d, scale)
        prefills = meta.prefills
        if meta.fresh_prefills is not None and self.prefill_fresh(q, k, v, meta, out, scale):
            prefills = [s for s in prefills if s.block_table is not None]
        if meta.cached_prefills is not None and self.prefill_cached(
            q, k_cache, v_cache, meta, out, scale
        ):
            prefills = [s for s in prefills if s.block_table is None]
        gqa = q.shape[1] != k.shape[1]
        for s in prefills:
            rows = slice(s.token_start, s.token_start + s.num_tokens)
            # NOTE: 4-D inputs: torch's CPU flash-attention kernel takes them (3-D ones fall
            # back to the unfused math path, ~10x slower).
            qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, Q, D]
            if s.block_table is None:
                ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
                mask, causal = None, True
            else:
                ks, vs = gather_kv(k_cache, v_cache, s.block_table, q.shape[-1], q.dtype)
                mask, causal = s.key_mask(ks.shape[1]), False
            res = F.scaled_dot_product_attention(
                qs,
                ks.unsqueeze(0),
                vs.unsqueeze(0),
                attn_mask=mask,
                is_causal=causal,
                scale=scale,
                enable_gqa=gqa,
            )
            out[rows] = res[0].transpose(0, 1)
        return out

    def prefill_fresh(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor,
        scale: float,
    ) -> bool:
        """Attend every fresh prefill (nothing cached) into ``out`` in one kernel call; False
        where this backend has no such kernel (each then runs one SDPA)."""
        return False

    def prefill_cached(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor,
        scale: float,
    ) -> bool:
        """Attend every prefill over cached context (``meta.cached_prefills``; its own K/V
        already in the cache) into ``out`` in one kernel call; False where this backend has no
        such kernel (each then runs one SDPA over its gathered blocks)."""
        return False

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        d: DecodeMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Gather every sequence's blocks, mask by length, one SDPA."""
        b, nb = d.block_tables.shape
        ks, vs = gather_kv(k_cache, v_cache, d.block_tables.flatten(), q.shape[-1], q.dtype)
        h, dim = ks.shape[0], ks.shape[-1]
        ks = ks.view(h, b, -1, dim).transpose(0, 1)
        vs = vs.view(h, b, -1, dim).transpose(0, 1)
        res = F.scaled_dot_product_attention(
            q.unsqueeze(2),
            ks,
            vs,
            attn_mask=d.key_mask,
            scale=scale,
            enable_gqa=h != q.shape[1],
        )
        return res.squeeze(2)

    def encoder_forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: EncoderMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Bidirectional attention within each sequence (an encoder: no KV cache). q, k, v:
        [T, H, D] -> [T, H, D]. The sequences are padded to the longest into one SDPA (a key
        mask hides the pads), which runs as one fused kernel instead of one call each."""
        t, h, d = q.shape
        if len(meta.seq_lens) == 1:
            res = F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale
            )
            return res.transpose(0, 1)
        b, length = meta.pad_index.shape

        def padded(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [B, H, L, D]
            x = torch.cat([x, x.new_zeros(1, h, d)])
            return x[meta.pad_index].transpose(1, 2)

        res = F.scaled_dot_product_attention(
            padded(q), padded(k), padded(v), attn_mask=meta.key_mask, scale=scale
        )
        return res.transpose(1, 2).reshape(b * length, h, d)[meta.token_index]


def window_matters(meta: AttentionMetadata, window: int) -> bool:
    """Whether some query of the step has more than ``window`` keys before it (else a window
    changes nothing, and the backend's own kernels run)."""
    longest = meta.decode.max_seq_len if meta.decode is not None else 0
    for s in meta.prefills:
        longest = max(longest, s.start_pos + s.num_tokens)
    return longest > window


def windowed_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int,
    decode_kernel: Callable[[torch.Tensor, DecodeMetadata], torch.Tensor] | None = None,
    fresh_kernel: Callable[[torch.Tensor], bool] | None = None,
    cached_kernel: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Sliding-window attention for every backend: each query row sees its last ``window``
    keys (itself included), as transformers' sliding-window mask does. A backend with windowed
    kernels passes them: ``decode_kernel(q rows, decode metadata)`` for the step's decodes
    (drafts too), ``fresh_kernel(out)`` for every fresh prefill at once and
    ``cached_kernel(out)`` for every prefill over cached context (False: none ran); the rest
    run torch ops over the blocks the window reaches, under a banded mask."""
    out = q.new_zeros(q.shape)
    gqa = q.shape[1] != k.shape[1]
    block_size = v_cache.shape[2]
    d = meta.decode
    if d is not None and decode_kernel is not None:
        out[: d.num_tokens] = decode_kernel(q[: d.num_tokens], d)
    elif d is not None:
        n = d.num_tokens
        q_lens = (
            torch.ones_like(d.seq_lens)
            if d.query_start_loc is None
            else d.query_start_loc[1:] - d.query_start_loc[:-1]
        )
        # each decode row (a sequence's newest token, then its drafts) at its own position
        dev = q.device
        seq_of_row = torch.repeat_interleave(torch.arange(len(q_lens), device=dev), q_lens)
        first = torch.cumsum(q_lens, 0) - q_lens
        offset = torch.arange(n, device=dev) - first[seq_of_row]
        pos = d.seq_lens[seq_of_row] - q_lens[seq_of_row] + offset
        tables = d.block_tables[seq_of_row]
        out[:n] = _attend_rows(q[:n], k_cache, v_cache, tables, pos, block_size, scale, window, gqa)
    prefills = meta.prefills
    if meta.fresh_prefills is not None and fresh_kernel is not None and fresh_kernel(out):
        prefills = [s for s in prefills if s.block_table is not None]
    if meta.cached_prefills is not None and cached_kernel is not None and cached_kernel(out):
        prefills = [s for s in prefills if s.block_table is None]
    for s in prefills:
        rows = slice(s.token_start, s.token_start + s.num_tokens)
        pos = s.start_pos + torch.arange(s.num_tokens, device=q.device)
        qs = q[rows].transpose(0, 1).unsqueeze(0)
        if s.block_table is None:  # nothing cached: the keys are this step's own
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            kpos = pos
        else:  # the blocks from the first query's window on
            first_block = max(0, s.start_pos - window + 1) // block_size
            table = s.block_table[first_block:]
            ks, vs = gather_kv(k_cache, v_cache, table, q.shape[-1], q.dtype)
            kpos = first_block * block_size + torch.arange(ks.shape[1], device=q.device)
        mask = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] > pos[:, None] - window)
        res = F.scaled_dot_product_attention(
            qs, ks.unsqueeze(0), vs.unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=gqa
        )
        out[rows] = res[0].transpose(0, 1)
    return out


def _attend_rows(q, k_cache, v_cache, tables, pos, block_size, scale, window, gqa):
    """One query row per sequence of blocks ``tables[i]`` at position ``pos[i]``."""
    b = tables.shape[0]
    ks, vs = gather_kv(k_cache, v_cache, tables.flatten(), q.shape[-1], q.dtype)
    h, dim = ks.shape[0], ks.shape[-1]
    ks = ks.view(h, b, -1, dim).transpose(0, 1)
    vs = vs.view(h, b, -1, dim).transpose(0, 1)
    kpos = torch.arange(ks.shape[2], device=q.device)
    mask = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] > pos[:, None] - window)
    res = F.scaled_dot_product_attention(
        q.unsqueeze(2), ks, vs, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=gqa
    )
    return res.squeeze(2)
