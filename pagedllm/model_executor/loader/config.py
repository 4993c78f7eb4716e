"""``load_hf_config``: a model's transformers config, from config.json or GGUF metadata."""

from __future__ import annotations

import os

from transformers import AutoConfig, PretrainedConfig

from pagedllm.model_executor.loader.gguf_reader import gguf_load_error
from pagedllm.model_executor.loader.quantized_hf_weights import parse_quantization_config
from pagedllm.model_executor.loader.source import ModelSource


def load_hf_config(source: ModelSource) -> PretrainedConfig:
    """AutoConfig for the source; a corrupt GGUF, or a checkpoint quantized by a method pagedllm
    cannot run, raises ValueError naming the file.

    Rope settings stay where transformers 5 keeps them (``config.rope_parameters``).
    """
    if source.gguf_file is None:
        config = AutoConfig.from_pretrained(source.path)
        check_quantization_config(config, source.path)
        return config
    directory, filename = os.path.split(source.gguf_file)
    try:
        return AutoConfig.from_pretrained(directory, gguf_file=filename)
    except Exception as err:
        raise gguf_load_error(source.gguf_file, "a model config", err) from err


def check_quantization_config(hf_config: PretrainedConfig, where: str) -> None:
    """A checkpoint quantized by a method or scheme pagedllm cannot run (its
    ``quantization_config``) is refused at load with a ValueError that says so, instead of
    failing on its first packed tensor (or loading garbage)."""
    qconfig = getattr(hf_config, "quantization_config", None)
    if not qconfig:
        return
    if not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict() if hasattr(qconfig, "to_dict") else vars(qconfig)
    parse_quantization_config(qconfig, where)
