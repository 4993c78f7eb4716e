"""POST /v1/embeddings (OpenAI's), /pooling and /score (vLLM's) on a pooling model: each input
becomes one engine request, all added at once and batched by the scheduler like any prompt."""

from __future__ import annotations

import base64
import math
import time

import numpy as np
from fastapi.responses import JSONResponse

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import (
    EmbeddingData,
    EmbeddingInput,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingData,
    PoolingRequest,
    PoolingResponse,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    make_usage,
)
from pagedllm.entrypoints.openai.serving import OpenAIServing, random_id
from pagedllm.outputs import EmbeddingRequestOutput
from pagedllm.pooling_params import PoolingParams


class OpenAIServingEmbedding(OpenAIServing):
    async def create(self, req: EmbeddingRequest, deadline: float | None = None) -> JSONResponse:
        """/v1/embeddings, and /pooling for a PoolingRequest (same fields, vLLM's shape)."""
        self.check_model(req.model)  # a pooling server serves no adapters
        self.check_runner("pooling")
        items = _input_items(req.input)
        self.check_fan_out(len(items), 1)
        params = self._params(req.dimensions, req.normalize, req.truncate_prompt_tokens)
        outs = await self._embed(items, params, deadline)
        created = int(time.time())
        usage = make_usage(sum(len(o.prompt_token_ids) for o in outs), 0)
        vectors = [_encode(o.outputs.embedding, req.encoding_format) for o in outs]
        if isinstance(req, PoolingRequest):
            pooled = PoolingResponse(
                id=random_id("pool"),
                created=created,
                model=self.served_model_name,
                data=[PoolingData(index=i, data=v) for i, v in enumerate(vectors)],
                usage=usage,
            )
            return JSONResponse(pooled.model_dump())
        body = EmbeddingResponse(
            id=random_id("embd"),
            created=created,
            model=self.served_model_name,
            data=[EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)],
            usage=usage,
        )
        return JSONResponse(body.model_dump())

    async def score(self, req: ScoreRequest, deadline: float | None = None) -> JSONResponse:
        """Cosine similarity of each (text_1, text_2) pair's embeddings."""
        self.check_model(req.model)
        self.check_runner("pooling")
        left = [req.text_1] if isinstance(req.text_1, str) else list(req.text_1)
        right = [req.text_2] if isinstance(req.text_2, str) else list(req.text_2)
        if not left or not right:
            raise OpenAIError("text_1 and text_2 must not be empty", param="text_1")
        if len(left) == 1:
            left = left * len(right)
        if len(left) != len(right):
            raise OpenAIError(
                f"text_1 has {len(left)} texts and text_2 {len(right)}: give one text_1, or "
                "as many as text_2",
                param="text_2",
            )
        items: list[str | list[int]] = [*left, *right]
        self.check_fan_out(len(items), 1)
        params = self._params(None, True, req.truncate_prompt_tokens)
        outs = await self._embed(items, params, deadline)
        vectors = np.array([o.outputs.embedding for o in outs], dtype=np.float64)
        a, b = vectors[: len(left)], vectors[len(left) :]
        scores = (a * b).sum(axis=1)  # normalized: the dot product is the cosine
        body = ScoreResponse(
            id=random_id("score"),
            created=int(time.time()),
            model=self.served_model_name,
            data=[ScoreData(index=i, score=float(s)) for i, s in enumerate(scores)],
            usage=make_usage(sum(len(o.prompt_token_ids) for o in outs), 0),
        )
        return JSONResponse(body.model_dump())

    @staticmethod
    def _params(
        dimensions: int | None, normalize: bool | None, truncate: int | None
    ) -> PoolingParams:
        try:
            return PoolingParams(dimensions, normalize, truncate)
        except ValueError as err:
            param = "dimensions" if "dimensions" in str(err) else "truncate_prompt_tokens"
            raise OpenAIError(str(err), param=param) from None

    async def _embed(
        self, items: list[str | list[int]], params: PoolingParams, deadline: float | None
    ) -> list[EmbeddingRequestOutput]:
        try:
            streams = await self.add_requests(random_id("embd"), items, [params] * len(items))
        except ValueError as err:
            raise _name_input(err) from None
        outs: list[EmbeddingRequestOutput | None] = [None] * len(items)
        async for i, out in self.outputs(streams, deadline):
            if out.finished:
                outs[i] = out
        if any(o is None or o.outputs is None for o in outs):
            raise OpenAIError("the request was aborted before its embeddings were made", 503)
        return outs  # type: ignore[return-value]


def _input_items(value: EmbeddingInput) -> list[str | list[int]]:
    if isinstance(value, str):
        items: list[str | list[int]] = [value]
    elif value and all(isinstance(t, int) for t in value):
        items = [list(value)]  # type: ignore[arg-type]
    else:
        items = list(value)  # type: ignore[arg-type]
    if not items:
        raise OpenAIError("input must not be empty", param="input")
    for item in items:
        if not item:
            raise OpenAIError("input must not hold an empty text or token list", param="input")
    return items


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """OpenAI's base64 form: the little-endian float32 bytes (what its client decodes)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    if not all(math.isfinite(x) for x in vector):
        raise OpenAIError("the model produced a non-finite embedding", 500)
    return vector


def _name_input(exc: ValueError) -> OpenAIError:
    """The engine's ValueErrors about a prompt are about ``input``."""
    message = str(exc)
    param = "dimensions" if message.startswith("dimensions") else "input"
    if message.startswith("truncate_prompt_tokens"):
        param = "truncate_prompt_tokens"
    return OpenAIError(message, param=param)
