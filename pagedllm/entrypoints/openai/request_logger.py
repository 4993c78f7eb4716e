"""--enable-log-requests: one log line per engine request (vLLM's RequestLogger). Off by
default: prompts are users' data and reach the logs only when the operator asks."""

from __future__ import annotations

import logging
from typing import Any

from pagedllm.lora import LoRARequest

logger = logging.getLogger("pagedllm.requests")


class RequestLogger:
    def __init__(self, max_log_len: int | None = None) -> None:
        self.max_log_len = max_log_len

    def log(
        self, request_id: str, prompt: Any, params: Any, lora_request: LoRARequest | None
    ) -> None:
        text, ids = None, None
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, dict):
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        elif isinstance(prompt, list):
            ids = prompt
        if self.max_log_len is not None:
            text = text[: self.max_log_len] if text is not None else None
            ids = ids[: self.max_log_len] if ids is not None else None
        logger.info(
            "Received request %s: prompt: %r, params: %s, prompt_token_ids: %s, lora_request: %s",
            request_id,
            text,
            params,
            ids,
            lora_request.lora_name if lora_request is not None else None,
        )
