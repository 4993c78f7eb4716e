"""The engine's per-token logprobs (token id -> Logprob, the sampled token plus the top k) in
OpenAI's two formats: the completions API's parallel lists and the chat API's per-token objects.
"""

from __future__ import annotations

import math

from pagedllm.entrypoints.openai.protocol import (
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)
from pagedllm.outputs import Logprob

# JSON has no -inf; a token the sampler could never pick gets this (vLLM does the same).
MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    if math.isnan(logprob) or logprob < MIN_LOGPROB:
        return MIN_LOGPROB
    return logprob


def _token_text(token_id: int, lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"<token {token_id}>"


def _sampled(token_id: int, entry: dict[int, Logprob]) -> Logprob:
    lp = entry.get(token_id)
    return lp if lp is not None else Logprob(-math.inf, None, None)


def completion_logprobs(
    token_ids: list[int], logprobs: list[dict[int, Logprob]], text_offset: int
) -> tuple[CompletionLogprobs, int]:
    """-> (logprobs of these tokens, the text offset after them). ``top_logprobs`` holds the
    sampled token plus the top k, so up to k + 1 entries, as in OpenAI's API."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        sampled = _sampled(token_id, entry)
        token = _token_text(token_id, sampled)
        out.tokens.append(token)
        out.token_logprobs.append(_finite(sampled.logprob))
        top: dict[str, float] = {}
        for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or math.inf):
            # Distinct tokens can decode alike (e.g. partial UTF-8); keep the better ranked.
            top.setdefault(_token_text(t, lp), _finite(lp.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out, text_offset


def chat_logprobs(
    token_ids: list[int], logprobs: list[dict[int, Logprob]], num_top: int
) -> list[ChatTokenLogprob]:
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        sampled = _sampled(token_id, entry)
        token = _token_text(token_id, sampled)
        top = sorted(
            ((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= num_top),
            key=lambda kv: kv[1].rank or 0,
        )
        content.append(
            ChatTokenLogprob(
                token=token,
                logprob=_finite(sampled.logprob),
                bytes=list(token.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(
                        token=_token_text(t, lp),
                        logprob=_finite(lp.logprob),
                        bytes=list(_token_text(t, lp).encode("utf-8")),
                    )
                    for t, lp in top
                ],
            )
        )
    return content
