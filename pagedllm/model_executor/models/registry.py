"""Which model class implements which ``architectures`` entry of config.json."""

from __future__ import annotations

from torch import nn

from pagedllm.model_executor.models.bert import BertModel
from pagedllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from pagedllm.model_executor.models.hf_config import ArchConfig
from pagedllm.model_executor.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "BertModel": BertModel,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def get_model_class(cfg: ArchConfig) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[cfg.architecture]
    except KeyError:
        raise ValueError(
            f"model architecture {cfg.architecture!r} is not supported; "
            f"supported: {sorted(MODEL_REGISTRY)}"
        ) from None
