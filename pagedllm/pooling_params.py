"""PoolingParams: what a pooling (embedding) request asks for, as vLLM's."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolingParams:
    """``dimensions``: cut the embedding to its first d values (Matryoshka models only), then
    normalize; ``normalize``: override the model's pooler config; ``truncate_prompt_tokens``:
    keep only that many prompt tokens (-1: the model's limit) instead of refusing a longer
    prompt."""

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and (
            isinstance(self.dimensions, bool)
            or not isinstance(self.dimensions, int)
            or self.dimensions < 1
        ):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")
        t = self.truncate_prompt_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or (t < 1 and t != -1)):
            raise ValueError(f"truncate_prompt_tokens must be -1 or a positive integer, got {t!r}")
