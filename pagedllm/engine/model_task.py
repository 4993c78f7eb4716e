"""What the engine runs a model for, decided once at start-up (vLLM's --runner / --convert):
``generate`` (text) or ``pooling`` (embeddings), and for pooling, how the final hidden states
become one vector (the PoolerConfig): the user's --pooler-config, over the model's
sentence-transformers files, over the defaults (CLS for an encoder without them, as vLLM;
last token for a decoder converted to an embedder)."""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.config import EngineArgs, PoolerConfig
from pagedllm.model_executor.loader import ModelSource
from pagedllm.model_executor.loader.sentence_transformers import (
    read_sentence_transformers_config,
)
from pagedllm.model_executor.models.hf_config import ArchConfig


@dataclass(frozen=True)
class ModelTask:
    runner_type: str  # "generate" or "pooling"
    pooler_config: PoolerConfig | None
    is_encoder: bool  # bidirectional, no KV cache
    max_len: int | None  # the length the embedder was trained for (sentence-transformers)


def resolve_model_task(
    args: EngineArgs, arch: ArchConfig, model_cls: type, source: ModelSource
) -> ModelTask:
    is_encoder = not getattr(model_cls, "uses_kv_cache", True)
    runner = args.runner
    if runner == "auto":
        runner = "pooling" if is_encoder or args.convert == "embed" else "generate"
    if runner == "generate" and is_encoder:
        raise ValueError(
            f"{arch.architecture} is an encoder: it makes embeddings, not text; serve it with "
            "--runner pooling (the default for it)"
        )
    if runner == "pooling" and args.convert == "none" and not is_encoder:
        raise ValueError(
            f"{arch.architecture} is a decoder: as a pooling model it needs --convert embed "
            "(or leave --convert auto)"
        )
    if runner == "generate":
        if args.pooler_config:
            raise ValueError("pooler_config is for pooling models (--runner pooling)")
        return ModelTask("generate", None, False, None)
    st = None if source.is_gguf else read_sentence_transformers_config(source.path)
    fields: dict = {"pooling_type": "CLS" if is_encoder else "LAST", "normalize": True}
    if st is not None:
        if st.pooling_type is not None:
            fields["pooling_type"] = st.pooling_type
        fields["normalize"] = st.normalize
    fields.update(PoolerConfig.parse(args.pooler_config))
    return ModelTask(
        "pooling", PoolerConfig(**fields), is_encoder, st.max_seq_length if st else None
    )
