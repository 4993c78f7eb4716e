"""``load_hf_config``: a model's transformers config, from config.json or GGUF metadata."""

from __future__ import annotations

import os

from transformers import AutoConfig, PretrainedConfig

from pagedllm.model_executor.loader.gguf_reader import gguf_load_error
from pagedllm.model_executor.loader.source import ModelSource


def load_hf_config(source: ModelSource) -> PretrainedConfig:
    """AutoConfig for the source; a corrupt GGUF raises ValueError naming the file.

    Rope settings stay where transformers 5 keeps them (``config.rope_parameters``).
    """
    if source.gguf_file is None:
        return AutoConfig.from_pretrained(source.path)
    directory, filename = os.path.split(source.gguf_file)
    try:
        return AutoConfig.from_pretrained(directory, gguf_file=filename)
    except Exception as err:
        raise gguf_load_error(source.gguf_file, "a model config", err) from err
