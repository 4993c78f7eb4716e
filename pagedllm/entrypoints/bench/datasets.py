"""Benchmark workloads: the requests every bench tool (and every engine it is compared with) runs.

A workload is a list of ``BenchRequest``: a prompt (text, or token ids for exact lengths) and the
exact number of tokens to generate. Every tool runs requests greedily with ignore_eos, so each
request yields exactly ``output_len`` tokens and engines are compared on the same work.

Two sources:
- a JSONL file, one object per line: ``{"prompt": str, "output_len": int, "prompt_len": int}``
  (``prompt_len`` is optional and informational; the same format as the peers' workload.jsonl);
- ``random``: seeded random prompts of a fixed length (token ids offline, words over HTTP).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

RANDOM_DATASET = "random"

# Common English words that most BPE vocabularies hold as one token (with their leading space),
# so a prompt of N words is close to N tokens; servers report the exact count in `usage`.
PROMPT_WORDS = (
    "the of and to in is was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said each she "
    "which do their time if will way about many then them write would like so these her long "
    "make thing see him two has look more day could go come did number sound no most people "
    "my over know water than call first who may down side been now find any new work part take "
    "get place made live where after back little only round man year came show every good me "
    "give our under name very through just form great think say help low line differ turn cause"
).split()


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request. ``prompt`` is text, or token ids when the length must be exact."""

    prompt: str | list[int]
    output_len: int
    # Prompt length in tokens as the dataset states it (exact for token ids; for text it is the
    # file's figure, or None). Tools report the count the engine or server actually saw.
    prompt_len: int | None = None


def load_jsonl_dataset(path: str, num_prompts: int | None = None) -> list[BenchRequest]:
    """Read a workload file; raises ValueError naming ``path:line`` for a malformed line."""
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {num_prompts}")
    requests: list[BenchRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if num_prompts is not None and len(requests) == num_prompts:
                break
            if not line.strip():
                continue
            requests.append(_parse_line(line, f"{path}:{lineno}"))
    if not requests:
        raise ValueError(f"{path}: the dataset holds no requests")
    if num_prompts is not None and len(requests) < num_prompts:
        raise ValueError(
            f"{path}: the dataset holds {len(requests)} requests, --num-prompts asked for "
            f"{num_prompts}"
        )
    return requests


def _parse_line(line: str, where: str) -> BenchRequest:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    output_len = obj.get("output_len")
    if not _is_positive_int(output_len):
        raise ValueError(f"{where}: 'output_len' must be a positive integer, got {output_len!r}")
    prompt_len = obj.get("prompt_len")
    if prompt_len is not None and not _is_positive_int(prompt_len):
        raise ValueError(f"{where}: 'prompt_len' must be a positive integer, got {prompt_len!r}")
    return BenchRequest(prompt=prompt, output_len=output_len, prompt_len=prompt_len)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def random_token_requests(
    num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0
) -> list[BenchRequest]:
    """Prompts of exactly ``input_len`` uniformly random token ids (like vLLM's random dataset)."""
    _check_random_shape(num_prompts, input_len, output_len)
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(num_prompts, input_len))
    return [
        BenchRequest(prompt=row.tolist(), output_len=output_len, prompt_len=input_len)
        for row in ids
    ]


def random_text_requests(
    num_prompts: int, input_len: int, output_len: int, seed: int = 0
) -> list[BenchRequest]:
    """Prompts of ``input_len`` random common words: about ``input_len`` tokens in any tokenizer,
    usable on chat endpoints and by servers that take no token ids."""
    if num_prompts == 0:
        return []
    _check_random_shape(num_prompts, input_len, output_len)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(PROMPT_WORDS), size=(num_prompts, input_len))
    return [
        BenchRequest(
            prompt=" ".join(PROMPT_WORDS[i] for i in row),
            output_len=output_len,
            prompt_len=input_len,
        )
        for row in picks
    ]


def _check_random_shape(num_prompts: int, input_len: int, output_len: int) -> None:
    for name, value in (
        ("--num-prompts", num_prompts),
        ("--input-len", input_len),
        ("--output-len", output_len),
    ):
        if not _is_positive_int(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
