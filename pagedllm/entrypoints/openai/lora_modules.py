"""The LoRA adapters a server serves under their own model names (``--lora-modules``, and
``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` with --allow-runtime-lora-updating):
a request's ``model`` picks the base model or one adapter."""

from __future__ import annotations

import itertools
import json

from pagedllm.lora import LoRARequest, read_peft_config


class LoRANameInUseError(ValueError):
    """The adapter's name is the base model's or another adapter's."""


def parse_lora_module(value: str) -> tuple[str, str]:
    """``name=path`` or vLLM's JSON form ``{"name": ..., "path": ...}`` -> (name, path)."""
    if value.lstrip().startswith("{"):
        try:
            spec = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"--lora-modules {value!r}: invalid JSON ({err})") from None
        name, path = spec.get("name"), spec.get("path")
    else:
        name, sep, path = value.partition("=")
        if not sep:
            raise ValueError(f"--lora-modules {value!r}: expected name=path")
    if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
        raise ValueError(f"--lora-modules {value!r}: needs a name and a path")
    return name, path


class LoRAModules:
    """Adapter name -> LoRARequest (ids given out once, never reused, so a reloaded name never
    meets KV cached for the adapter it replaced)."""

    def __init__(
        self, modules: tuple[tuple[str, str], ...], base_model_name: str, max_lora_rank: int
    ) -> None:
        self.base_model_name = base_model_name
        self.max_lora_rank = max_lora_rank
        self._ids = itertools.count(1)
        self.requests: dict[str, LoRARequest] = {}
        for name, path in modules:
            self.add(name, path)

    def add(self, name: str, path: str) -> LoRARequest:
        """Check the adapter's config (ValueError naming the problem) and register it."""
        if name == self.base_model_name or name in self.requests:
            raise LoRANameInUseError(f"the model name {name!r} is already in use")
        read_peft_config(path, self.max_lora_rank)
        request = LoRARequest(name, next(self._ids), path, self.base_model_name)
        self.requests[name] = request
        return request

    def remove(self, name: str) -> LoRARequest:
        try:
            return self.requests.pop(name)
        except KeyError:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded") from None

    def get(self, name: str) -> LoRARequest | None:
        return self.requests.get(name)
