"""LoRA adapters (peft's format) served over one base model: the request type and the adapter
config check, shared by the engine and the model runner (which holds the weights)."""

from pagedllm.lora.peft_config import PeftLoRAConfig, read_peft_config
from pagedllm.lora.request import LoRARequest

__all__ = ["LoRARequest", "PeftLoRAConfig", "read_peft_config"]
