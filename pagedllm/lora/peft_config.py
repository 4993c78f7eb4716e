"""Read and check a peft LoRA adapter's adapter_config.json before any weight is loaded, so a bad
adapter is a clear ValueError (a 400 over HTTP) rather than a failure inside a step."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

# The projections an adapter may target (Llama-family names, as peft writes them).
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class PeftLoRAConfig:
    rank: int
    alpha: float
    use_rslora: bool
    weights_file: str  # absolute path

    @property
    def scale(self) -> float:
        """peft's scaling of B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_peft_config(path: str, max_rank: int) -> PeftLoRAConfig:
    if not os.path.isdir(path):
        raise ValueError(f"LoRA adapter path {path!r} is not a directory")
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path!r} is not a peft LoRA adapter: it has no adapter_config.json")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file}: cannot read it as JSON ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_file}: peft_type must be LORA")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{config_file}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise ValueError(
            f"LoRA adapter {path!r} has rank {rank}, more than --max-lora-rank {max_rank}"
        )
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "bias": config.get("bias", "none") not in ("none", None),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "layers_to_transform": config.get("layers_to_transform") is not None,
        "target_parameters": bool(config.get("target_parameters")),
    }
    used = [name for name, on in unsupported.items() if on]
    if used:
        raise ValueError(f"{config_file}: {', '.join(used)} is not supported")
    targets = config.get("target_modules") or []
    if isinstance(targets, list):
        bad = sorted(set(targets) - set(SUPPORTED_TARGETS))
        if bad:
            raise ValueError(
                f"{config_file}: target_modules {bad} are not supported (supported: "
                f"{', '.join(SUPPORTED_TARGETS)})"
            )
    weights = [os.path.join(path, name) for name in WEIGHT_FILES]
    weights = [w for w in weights if os.path.isfile(w)]
    if not weights:
        raise ValueError(f"{path!r} has no adapter weights ({' or '.join(WEIGHT_FILES)})")
    alpha = config.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{config_file}: lora_alpha must be a number")
    return PeftLoRAConfig(rank, float(alpha), bool(config.get("use_rslora")), weights[0])
