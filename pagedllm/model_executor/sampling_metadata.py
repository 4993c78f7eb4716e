"""Build the sampler's per-row tensors from the requests that sample this step."""

from __future__ import annotations

import torch

from pagedllm.model_executor.request_state import StepRequest
from pagedllm.model_executor.sampler import Penalties, SamplingBatch


def build_sampling_batch(
    requests: list[StepRequest],
    generators: dict[str, torch.Generator],
    vocab_size: int,
    device: torch.device,
) -> SamplingBatch:
    """One row per request, or 1 + its drafts for a request that brings draft tokens: row t of
    such a request samples after its t-th draft (so t more output tokens, for min_tokens)."""
    offsets = [t for r in requests for t in range(1 + len(r.spec_token_ids))]
    if len(offsets) > len(requests):
        requests = [r for r in requests for _ in range(1 + len(r.spec_token_ids))]
    params = [r.sampling_params for r in requests]
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
    batch = SamplingBatch(
        temperature=temperature.to(device),
        all_greedy=all(p.is_greedy for p in params),
        any_greedy=any(p.is_greedy for p in params),
        unit_temperature=all(p.temperature in (0.0, 1.0) for p in params),
    )
    if not batch.all_greedy:
        if any(p.top_k is not None for p in params):
            batch.top_k = torch.tensor(
                [min(p.top_k or vocab_size, vocab_size) for p in params], device=device
            )
        if any(p.top_p < 1.0 for p in params):
            batch.top_p = torch.tensor([p.top_p for p in params], device=device)
        if any(p.min_p > 0.0 for p in params):
            batch.min_p = torch.tensor([p.min_p for p in params], device=device)
        for row, r in enumerate(requests):
            if r.sampling_params.seed is not None and not r.sampling_params.is_greedy:
                gen = generators.get(r.req_id)
                if gen is None:
                    gen = torch.Generator(device=device)
                    gen.manual_seed(r.sampling_params.seed)
                    generators[r.req_id] = gen
                batch.generators[row] = gen
    for row, r in enumerate(requests):
        p = r.sampling_params
        if len(r.output_token_ids) + offsets[row] < p.min_tokens and p.all_stop_token_ids:
            batch.banned.append((row, sorted(p.all_stop_token_ids)))
    if any(p.has_penalties for p in params):
        batch.penalties = _penalties(requests, vocab_size, device)
    requested = [p.logprobs for p in params if p.logprobs is not None]
    if requested:
        batch.max_num_logprobs = max(requested)
    return batch


def _penalties(requests: list[StepRequest], vocab_size: int, device) -> Penalties:
    n = len(requests)
    counts = torch.zeros(n, vocab_size, dtype=torch.float32)
    prompt_mask = torch.zeros(n, vocab_size, dtype=torch.bool)
    for row, r in enumerate(requests):
        if not r.sampling_params.has_penalties:
            continue
        if r.output_token_ids:
            out = torch.tensor(r.output_token_ids, dtype=torch.int64)
            counts[row].scatter_add_(0, out, torch.ones(len(out)))
        prompt_mask[row, torch.tensor(r.prompt_token_ids, dtype=torch.int64)] = True
    params = [r.sampling_params for r in requests]
    return Penalties(
        presence=torch.tensor([p.presence_penalty for p in params], device=device),
        frequency=torch.tensor([p.frequency_penalty for p in params], device=device),
        repetition=torch.tensor([p.repetition_penalty for p in params], device=device),
        output_counts=counts.to(device),
        prompt_mask=prompt_mask.to(device),
    )
