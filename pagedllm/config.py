"""Engine configuration: plain dataclasses, validated on construction.

``EngineArgs`` is the flat, user-facing set of knobs (what ``LLM(**kwargs)`` and the CLI take);
``EngineConfig`` is what the engine runs with once the model's own config is known.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedllm import envs
from pagedllm.cpu_info import has_native_bf16

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "bfloat16", "int8")  # auto: the model dtype
# int8 and gguf are chosen by the flag; the others are a checkpoint's own (config.json's
# quantization_config, read at load whether or not the flag names them).
QUANTIZATIONS = (None, "int8", "gguf", "awq", "gptq", "compressed-tensors")
# vLLM's --runner / --convert: what the engine runs the model for.
RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed")
POOLING_TYPES = ("MEAN", "CLS", "LAST")
# 4 GiB, as the peers' vLLM CPU set-up (VLLM_CPU_KVCACHE_SPACE=4): in fp32 the shared workload
# (81K tokens at once) needs more than 2 GiB, which held 46.6K tokens and throttled it.
DEFAULT_CPU_KV_CACHE_MEMORY = 4 * 1024**3


@dataclass
class EngineArgs:
    """Every knob a user can set, named as in vLLM. ``None`` means "derive a sensible default"."""

    model: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    device: str | None = None
    # A dict or its JSON text, as vLLM's --speculative-config; "auto": n-gram drafts with the
    # defaults of SpeculativeConfig; None or "none": off.
    speculative_config: dict | str | None = "auto"
    tensor_parallel_size: int = 1
    # uni (in-process), mp (worker processes) or ray (Ray actors); None: uni for one rank,
    # else mp.
    distributed_executor_backend: str | None = None
    ray_address: str | None = None  # an existing Ray cluster (else env RAY_ADDRESS, else local)
    # generate (text), pooling (embeddings), or auto: pooling for an encoder (BertModel) or
    # with convert="embed", else generate. convert="embed" runs a decoder as an embedder
    # (last-token pooling, normalized).
    runner: str = "auto"
    convert: str = "auto"
    # vLLM's --pooler-config: {"pooling_type": MEAN|CLS|LAST, "normalize": bool}, over what
    # the model's sentence-transformers files (modules.json) say.
    pooler_config: dict | str | None = None
    # Multi-LoRA: adapters (peft format) selected per request; at most max_loras different
    # ones run in one step, each of rank <= max_lora_rank.
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    # Batch-invariant kernels: a request's greedy output does not depend on what else runs
    # (model_executor/backends/batch_invariant.py).
    deterministic: bool = False

    def __post_init__(self) -> None:
        SpeculativeConfig.parse(self.speculative_config)  # raises on a bad value
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        if self.convert not in CONVERTS:
            raise ValueError(f"convert must be one of {CONVERTS}, got {self.convert!r}")
        if self.runner == "generate" and self.convert == "embed":
            raise ValueError("convert='embed' makes an embedding model: use runner='pooling'")
        PoolerConfig.parse(self.pooler_config)  # raises on a bad value
        if self.dtype == "auto":
            self.dtype = auto_dtype(self.device)
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.deterministic and self.quantization == "int8":
            raise ValueError(
                "deterministic=True does not take quantization='int8' (its small steps run "
                "another kernel than its large ones)"
            )
        _check_positive("max_num_seqs", self.max_num_seqs)
        _check_positive("block_size", self.block_size)
        _check_positive("tensor_parallel_size", self.tensor_parallel_size)
        _check_positive("max_loras", self.max_loras)
        _check_positive("max_lora_rank", self.max_lora_rank)
        for name in ("max_model_len", "max_num_batched_tokens", "kv_cache_memory", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None:
                _check_positive(name, value)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def auto_dtype(device: str | None) -> str:
    """``--dtype auto``: bfloat16 where the hardware multiplies bf16 natively (CPUs with
    AVX512-BF16/AMX, CUDA GPUs with bf16), float32 elsewhere (bf16 runs on fp32 FMAs there: no
    faster, less exact).
    bf16 keeps the residual stream, norms, softmax and logits in fp32; its answers are checked
    for coherence against fp32 in tests/entrypoints/test_bf16_default.py."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if has_native_bf16() else "float32"


@dataclass
class SpeculativeConfig:
    """Speculative decoding by n-gram lookup in the request's own tokens (vLLM's method
    "ngram", prompt lookup decoding): when the last n tokens (n from prompt_lookup_max down to
    prompt_lookup_min) occurred before, the tokens that followed them are proposed as drafts and
    checked in the next forward pass, which reads the KV cache once for all of them. Greedy
    requests only (without penalties or logprobs), where verification keeps the output exact.
    ``adaptive``: drafts only where they pay, by the draft cost measured while serving and each
    request's acceptance (engine/draft_policy.py); False proposes wherever the n-grams match."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 3
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative_config: method must be 'ngram', got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config: {name} must be an integer >= 1")
        if not isinstance(self.adaptive, bool):
            raise ValueError("speculative_config: adaptive must be true or false")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("speculative_config: prompt_lookup_min > prompt_lookup_max")

    @classmethod
    def parse(cls, value: dict | str | None) -> SpeculativeConfig | None:
        """None / "none", "auto", a dict, or JSON text (the CLI's form) -> a config, or None
        when off."""
        if value is None or value in ("", "none", "off"):
            return None
        if value == "auto":
            return cls()
        return cls(**_config_fields(value, cls, "speculative_config"))


@dataclass
class PoolerConfig:
    """How a pooling model turns a prompt's final hidden states into one vector: the mean over
    its tokens, the first ([CLS]) token's, or the last token's; then L2-normalized or not."""

    pooling_type: str = "LAST"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"pooler_config: pooling_type must be one of {POOLING_TYPES}, "
                f"got {self.pooling_type!r}"
            )
        if not isinstance(self.normalize, bool):
            raise ValueError("pooler_config: normalize must be true or false")

    @classmethod
    def parse(cls, value: dict | str | None) -> dict:
        """The user's overrides (a dict, or JSON text from the CLI) as a checked dict."""
        if value is None or value == "":
            return {}
        raw = _config_fields(value, cls, "pooler_config")
        if isinstance(raw.get("pooling_type"), str):
            raw["pooling_type"] = raw["pooling_type"].upper()
        cls(**raw)  # checks the values
        return raw


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    max_loras: int | None = None  # different LoRA adapters in one step (None: no LoRA)

    def __post_init__(self) -> None:
        _check_positive("max_num_seqs", self.max_num_seqs)
        _check_positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _check_positive("max_model_len", self.max_model_len)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is disabled"
            )


@dataclass
class ModelConfig:
    """What the runner needs to know about the model, read off its Hugging Face config."""

    model: str
    dtype: str
    max_model_len: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    eos_token_ids: list[int] = field(default_factory=list)
    runner_type: str = "generate"  # or "pooling"
    pooler_config: PoolerConfig | None = None  # set for a pooling runner
    # Matryoshka: the embedding sizes the model was trained to be cut to (all of them up to
    # the hidden size with is_matryoshka); None: ``dimensions`` is refused.
    matryoshka_dimensions: list[int] | None = None


def _config_fields(value: dict | str, cls: type, what: str) -> dict[str, Any]:
    """A config given as a dict or as JSON text (the CLI's form) -> a copy of its fields,
    ValueError naming ``what`` for bad JSON or keys ``cls`` does not have."""
    raw: Any = value
    if isinstance(value, str):
        try:
            raw = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{what} must be a JSON object / dict")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"{what}: unknown keys {sorted(unknown)} (known: {sorted(names)})")
    return dict(raw)


def default_kv_cache_memory() -> int:
    return envs.kv_cache_memory() or DEFAULT_CPU_KV_CACHE_MEMORY


def _check_positive(name: str, value: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
