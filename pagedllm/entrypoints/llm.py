"""LLM: the offline API (vLLM's ``LLM.generate`` / ``LLM.chat``) over one LLMEngine."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine, PromptType
from pagedllm.entrypoints.chat_templates import tool_template
from pagedllm.lora import LoRARequest
from pagedllm.outputs import EmbeddingRequestOutput, RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams

ChatMessages = list[dict[str, Any]]


class LLM:
    """``LLM()`` serves the embedded default model; every EngineArgs field is a keyword."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise ValueError(f"unknown LLM arguments: {sorted(unknown)}")
        self.engine = LLMEngine(EngineArgs(model=model, **kwargs))
        self._counter = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine's tensor-parallel workers, if any (also at exit)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """``lora_request``: a LoRA adapter for every prompt, or one (or None: the base model)
        per prompt; the engine needs enable_lora=True."""
        if self.engine.is_pooling:
            raise ValueError(
                "this model runs as a pooling (embedding) model: use LLM.embed, or load a "
                "generative model for generate/chat"
            )
        return self._submit(prompts, sampling_params or SamplingParams(), use_tqdm, lora_request)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
        truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """vLLM's ``LLM.embed``: one embedding per prompt (``out.outputs.embedding``), from a
        pooling model (an encoder such as BERT, or a decoder with convert="embed")."""
        if not self.engine.is_pooling:
            raise ValueError(
                "this model runs as a generative model: embeddings need runner='pooling' "
                "(or convert='embed' for a decoder)"
            )
        if pooling_params is None:
            pooling_params = PoolingParams()
        if truncate_prompt_tokens is not None:
            cut = {"truncate_prompt_tokens": truncate_prompt_tokens}
            if isinstance(pooling_params, PoolingParams):
                pooling_params = dataclasses.replace(pooling_params, **cut)
            else:
                pooling_params = [dataclasses.replace(p, **cut) for p in pooling_params]
        return self._submit(prompts, pooling_params, use_tqdm)

    def _submit(self, prompts, params, use_tqdm: bool, lora_request=None) -> list:
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(params, (SamplingParams, PoolingParams)):
            params_list = [params] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} params for {len(prompts)} prompts")
        loras = _per_prompt(lora_request, len(prompts))
        # Validate everything before queueing anything, so one bad prompt rejects the call
        # without leaving half of it in the engine.
        request_ids = []
        try:
            for prompt, params, lora in zip(prompts, params_list, loras):
                request_id = str(next(self._counter))
                self.engine.add_request(request_id, prompt, params, lora_request=lora)
                request_ids.append(request_id)
        except ValueError:
            self.engine.abort_request(request_ids)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: ChatMessages | Sequence[ChatMessages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """``tools``: OpenAI-style tool dicts rendered into the prompt (vLLM's LLM.chat)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {"prompt": text, "prompt_token_ids": ids}
            for text, ids in (
                self.apply_chat_template(c, chat_template, add_generation_prompt, tools)
                for c in conversations
            )
        ]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def apply_chat_template(
        self,
        messages: ChatMessages,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[str, list[int]]:
        return apply_chat_template(
            self.engine.tokenizer, messages, chat_template, add_generation_prompt, tools
        )

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list:
        wanted = set(request_ids)
        finished: dict[str, RequestOutput | EmbeddingRequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while len(finished) < len(request_ids):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("engine has no work but requests are unfinished")
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]


def _per_prompt(lora_request, num_prompts: int) -> list:
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * num_prompts
    loras = list(lora_request)
    if len(loras) != num_prompts:
        raise ValueError(f"got {len(loras)} lora_requests for {num_prompts} prompts")
    return loras


def apply_chat_template(
    tokenizer: Any,
    messages: ChatMessages,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[int]]:
    """-> (prompt text, token ids). Raises ValueError for malformed messages. ``tools``
    (OpenAI's tool dicts) and tool turns in the messages are rendered with the model's template
    if it renders tools, else with pagedllm's ChatML tool template (chat_templates/)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with a 'role'")
        if m["role"] not in ("system", "user", "assistant", "tool", "developer"):
            raise ValueError(f"messages[{i}].role {m['role']!r} is not a known role")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "this model's tokenizer has no chat template (a base model?): give one with "
            "--chat-template (pagedllm serve) or chat_template= (LLM.chat), or use "
            "completions / generate"
        )
    if tools or uses_tools(messages):
        template = tool_template(template)
    text = tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        tools=tools or None,
    )
    # The template already holds any BOS token; don't add another.
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text, ids


def uses_tools(messages: ChatMessages) -> bool:
    """Earlier tool calls or tool results in the conversation."""
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
