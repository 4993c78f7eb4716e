"""Batched sampling: one pass over the [B, V] logits of every request that samples this step.

Order (as vLLM v1): raw logprobs -> min_tokens ban -> penalties -> greedy argmax, or
temperature -> min_p -> top_k/top_p -> random draw (per-request generators when seeded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pagedllm.model_executor.backends.base import TORCH_BACKEND
from pagedllm.model_executor.backends.kernels import TorchKernels


@dataclass
class Penalties:
    presence: torch.Tensor  # [B]
    frequency: torch.Tensor  # [B]
    repetition: torch.Tensor  # [B]
    output_counts: torch.Tensor  # [B, V] how often each token was generated
    prompt_mask: torch.Tensor  # [B, V] token occurs in the prompt


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [B], 0 = greedy
    all_greedy: bool
    any_greedy: bool = True  # False: no row needs the greedy pick
    unit_temperature: bool = False  # every row at temperature 0 or 1: logits need no scaling
    top_k: torch.Tensor | None = None  # [B] int64, V where disabled
    top_p: torch.Tensor | None = None  # [B]
    min_p: torch.Tensor | None = None  # [B]
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> generator
    penalties: Penalties | None = None
    banned: list[tuple[int, list[int]]] = field(default_factory=list)  # (row, token ids)
    max_num_logprobs: int | None = None


# (row, candidate token ids) -> those tokens' logits in fp32, computed afresh (see greedy_argmax)
ExactLogits = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B]
    logprobs: torch.Tensor | None = None  # [B] logprob of the sampled token
    ranks: torch.Tensor | None = None  # [B]
    top_ids: torch.Tensor | None = None  # [B, k]
    top_logprobs: torch.Tensor | None = None  # [B, k]


class Sampler:
    def __init__(self, kernels: TorchKernels = TORCH_BACKEND.kernels) -> None:
        self.kernels = kernels  # the backend's row argmax

    def __call__(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        exact_logits: ExactLogits | None = None,
    ) -> SamplerOutput:
        if batch.all_greedy and batch.max_num_logprobs is None:
            if not batch.banned and batch.penalties is None:
                # Plain greedy: argmax of the raw (bf16) logits, no fp32 copy of [B, V].
                return SamplerOutput(token_ids=greedy_argmax(logits, exact_logits, self.kernels))
        raw = logits
        logits = logits.float()
        raw_logprobs = None
        if batch.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if batch.banned or batch.penalties is not None:
            logits = logits.clone()
        for row, token_ids in batch.banned:
            logits[row, token_ids] = float("-inf")
        if batch.penalties is not None:
            logits = apply_penalties(logits, batch.penalties)

        if batch.all_greedy:
            token_ids = self._greedy(raw, logits, batch, exact_logits)
        else:
            token_ids = self._random(logits, batch)
            if batch.any_greedy:
                greedy = self._greedy(raw, logits, batch, exact_logits)
                token_ids = torch.where(batch.temperature == 0.0, greedy, token_ids)
        out = SamplerOutput(token_ids=token_ids)
        if raw_logprobs is not None:
            out.logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
            out.ranks = (raw_logprobs > out.logprobs.unsqueeze(1)).sum(dim=-1) + 1
            if batch.max_num_logprobs > 0:
                out.top_logprobs, out.top_ids = raw_logprobs.topk(batch.max_num_logprobs, dim=-1)
        return out

    def _greedy(
        self,
        raw: torch.Tensor,
        processed: torch.Tensor,
        batch: SamplingBatch,
        exact_logits: ExactLogits | None,
    ) -> torch.Tensor:
        """Greedy picks that depend on the row alone, not on what else is in the batch: a row
        with no ban or penalty of its own is decided on its raw logits with the fp32 tie-break,
        exactly as in an all-greedy batch; only rows with their own bans or penalties use the
        processed logits."""
        if exact_logits is None or raw.dtype == torch.float32:
            return greedy_argmax(processed, kernels=self.kernels)
        greedy_rows = batch.temperature == 0.0
        own = torch.zeros_like(greedy_rows)
        for row, _ in batch.banned:
            own[row] = True
        if batch.penalties is not None:
            p = batch.penalties
            own |= (p.presence != 0) | (p.frequency != 0) | (p.repetition != 1)
        if not bool((greedy_rows & ~own).any()):
            return greedy_argmax(processed, kernels=self.kernels)
        # NOTE: one pass over [B, V] where no row has bans or penalties of its own (the usual
        # mixed batch), two only where some do.
        tie_broken = greedy_argmax(raw, exact_logits, self.kernels)
        if not bool(own.any()):
            return tie_broken
        return torch.where(own, greedy_argmax(processed, kernels=self.kernels), tie_broken)

    def _random(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if not batch.unit_temperature:
            temperature = torch.where(batch.temperature == 0.0, 1.0, batch.temperature)
            logits = logits / temperature.unsqueeze(1)
        if batch.min_p is not None:
            probs = torch.softmax(logits, dim=-1)
            threshold = batch.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if batch.top_k is not None or batch.top_p is not None:
            logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        probs = torch.softmax(logits, dim=-1)
        # Inverse-CDF draw: one uniform per row against the cumulative distribution (float64, so
        # rounding cannot shift mass between tokens). ~20x cheaper on CPU than drawing V random
        # numbers per row (exponential race, torch.multinomial). Drawing each seeded row's
        # uniform from the request's own generator makes it independent of batching.
        u = torch.empty((probs.shape[0], 1), dtype=torch.float64, device=probs.device)
        if len(batch.generators) < probs.shape[0]:
            u.uniform_()
        for row, generator in batch.generators.items():
            u[row].uniform_(generator=generator)
        return inverse_cdf_draw(probs, u)


# Tokens a block of inverse_cdf_draw's first level: a cumulative sum over all of a [16, 49152]
# step took ~1 ms (Intel Xeon model 207), 2% of a decode step; over block sums and then one
# block per row, ~0.2 ms.
CDF_BLOCK = 256


def inverse_cdf_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token i of each row where cdf[i - 1] <= u * total < cdf[i] (cdf in float64): first the
    block of CDF_BLOCK tokens by the block sums, then the token inside it by that block's own
    cumulative sum. Zero-probability tokens (masked by top-k/top-p/min-p) have an empty
    interval and are never drawn, also where the two levels' roundings disagree."""
    rows, vocab = probs.shape
    pad = -vocab % CDF_BLOCK
    padded = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    blocks = padded.view(rows, -1, CDF_BLOCK)
    block_cdf = blocks.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)
    total = block_cdf[:, -1:]
    zero = torch.zeros_like(total)
    # below the total even where u * total rounds up to it
    target = torch.minimum(u * total, torch.nextafter(total, zero))
    # the block whose interval holds the target: its sum is > 0
    b = torch.searchsorted(block_cdf, target, right=True)
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)), 0.0)
    inner = blocks[torch.arange(rows, device=probs.device), b.squeeze(1)]
    inner_cdf = inner.cumsum(dim=-1, dtype=torch.float64)
    # The target inside the block, kept in [0, the block's own sum): right=True then lands on a
    # token whose probability is > 0 (a step up of inner_cdf).
    top = torch.nextafter(inner_cdf[:, -1:], zero)
    local = torch.minimum((target - before).clamp_(min=0.0), top)
    j = torch.searchsorted(inner_cdf, local, right=True)
    return (b * CDF_BLOCK + j).squeeze(1)


def greedy_argmax(
    logits: torch.Tensor,
    exact_logits: ExactLogits | None = None,
    kernels: TorchKernels = TORCH_BACKEND.kernels,
) -> torch.Tensor:
    """Row-wise argmax, ties to the lowest index (as torch.argmax).

    With ``exact_logits`` and bf16/fp16 logits, a row whose best and runner-up values lie within
    one rounding step of each other is decided by the fp32 logits of the tokens in that window:
    rounding to bf16 (8 significant bits, a step of 0.125 at a logit of 20) can tie or swap two
    candidates that fp32 tells apart, and did so for this model's answer to "What is the capital
    of France?". Such rows are rare; the check rides on the argmax's single pass.
    """
    if exact_logits is None or logits.dtype == torch.float32 or logits.shape[-1] < 2:
        return kernels.argmax_rows(logits)
    ids, gaps = kernels.argmax_gap_rows(logits)
    best = logits.gather(1, ids.unsqueeze(1)).squeeze(1).float()
    step = rounding_step(best, logits.dtype)
    for row in torch.nonzero(gaps <= step).flatten().tolist():
        candidates = torch.nonzero(logits[row].float() >= best[row] - step[row]).flatten()
        ids[row] = candidates[int(torch.argmax(exact_logits(row, candidates)))]
    return ids


def rounding_step(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` values at |x| (fp32 values in, fp32 out)."""
    _, exponent = torch.frexp(x)
    return torch.ldexp(torch.full_like(x, torch.finfo(dtype).eps), exponent - 1)


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    seen = p.prompt_mask | (p.output_counts > 0)
    rep = p.repetition.unsqueeze(1).expand_as(logits)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - p.frequency.unsqueeze(1) * p.output_counts
    return logits - p.presence.unsqueeze(1) * (p.output_counts > 0).to(logits.dtype)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).clamp(min=0).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p.unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return sorted_logits.scatter(1, order, sorted_logits)
