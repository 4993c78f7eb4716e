"""Which data-parallel replica serves a request: the one that holds the longest cached prefix
of its prompt, unless that replica is much busier than the least-loaded one; otherwise the
least-loaded (fewest requests in flight: waiting + running, as the front end counts them).

The router cannot see the replicas' KV caches, so it remembers which replica it sent each
prompt prefix to (chained hashes of fixed-size chunks of the prompt text, as sglang's
cache-aware router approximates its radix tree): a chat's next turn, or requests that share a
system prompt, find the replica whose prefix cache has those tokens. Replicas evict; the
router's memory is bounded (LRU) and only steers, it is never needed for correctness."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

# Prefix granularity in characters (~32 tokens of English): shorter shared prefixes are not
# worth a less balanced batch.
CHUNK_CHARS = 128
# A replica with the prefix is chosen unless it has both more than this many requests in flight
# beyond the least-loaded one and more than twice its load (sglang's router balances alike).
MAX_IMBALANCE = 8
MAX_REMEMBERED_PREFIXES = 200_000


class DataParallelRouter:
    def __init__(self, num_replicas: int) -> None:
        if num_replicas < 1:
            raise ValueError("num_replicas must be >= 1")
        self.in_flight = [0] * num_replicas
        self.routed = [0] * num_replicas
        self.prefix_routed = [0] * num_replicas
        self._owner: OrderedDict[bytes, int] = OrderedDict()

    def route(self, prompt_text: str) -> int:
        """Pick a replica for a prompt and count it in flight there (call ``done`` after)."""
        keys = _prefix_keys(prompt_text)
        least = min(range(len(self.in_flight)), key=lambda r: (self.in_flight[r], self.routed[r]))
        choice = least
        for key in reversed(keys):  # the longest remembered prefix first
            owner = self._owner.get(key)
            if owner is None:
                continue
            load, low = self.in_flight[owner], self.in_flight[least]
            if load - low <= MAX_IMBALANCE or load <= 2 * low:
                choice = owner
                self.prefix_routed[owner] += 1
            break
        for key in keys:
            self._owner[key] = choice
            self._owner.move_to_end(key)
        while len(self._owner) > MAX_REMEMBERED_PREFIXES:
            self._owner.popitem(last=False)
        self.in_flight[choice] += 1
        self.routed[choice] += 1
        return choice

    def done(self, replica: int) -> None:
        self.in_flight[replica] -= 1


def _prefix_keys(text: str) -> list[bytes]:
    """One key per whole chunk of ``text``: the hash of everything up to that chunk's end."""
    keys, h = [], hashlib.blake2b(digest_size=16)
    for end in range(CHUNK_CHARS, len(text) + 1, CHUNK_CHARS):
        h.update(text[end - CHUNK_CHARS : end].encode())
        keys.append(h.copy().digest())
    return keys


def prompt_text(body: dict) -> str:
    """The text a request's prompt starts with, for prefix routing: a completion's prompt, or
    a chat's messages in order (role and content), as the chat template would lay them out."""
    if "messages" in body and isinstance(body["messages"], list):
        parts = []
        for message in body["messages"]:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"<{message.get('role', '')}>{content or ''}")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else " ".join(map(str, prompt))
    return prompt if isinstance(prompt, str) else ""
