"""``load_tokenizer``: the model's tokenizer; GGUF-built ones are fixed to match llama.cpp."""

from __future__ import annotations

import logging
import os
from typing import Any

from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagedllm.model_executor.loader.gguf_reader import gguf_load_error, open_gguf, read_metadata
from pagedllm.model_executor.loader.source import ModelSource

logger = logging.getLogger(__name__)

# llama.cpp pre-tokenizer types that split every digit (\p{N}) first and then apply the GPT-2 regex
# (StarCoder style). transformers has no split regex for them and falls back to plain ByteLevel.
STARCODER_STYLE_PRE_TYPES = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
)


def load_tokenizer(source: ModelSource, tokenizer: str | None = None) -> PreTrainedTokenizerBase:
    """AutoTokenizer for ``tokenizer`` (a directory or hub repo id) if given, else for the model."""
    if tokenizer:
        return AutoTokenizer.from_pretrained(tokenizer)
    if source.gguf_file is None:
        return AutoTokenizer.from_pretrained(source.path)
    directory, filename = os.path.split(source.gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    except Exception as err:
        raise gguf_load_error(source.gguf_file, "a tokenizer", err) from err
    fix_gguf_tokenizer(tok, read_metadata(open_gguf(source.gguf_file)))
    return tok


def fix_gguf_tokenizer(tok: PreTrainedTokenizerBase, meta: dict[str, Any]) -> None:
    """Make a GGUF-built tokenizer behave like llama.cpp and the original tokenizer.json."""
    template = meta.get("tokenizer.chat_template")
    if not tok.chat_template and template:
        logger.debug("restoring the chat template from GGUF metadata")
        tok.chat_template = template

    pre_type = meta.get("tokenizer.ggml.pre")
    if meta.get("tokenizer.ggml.model") != "gpt2" or pre_type not in STARCODER_STYLE_PRE_TYPES:
        return
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return
    current = backend.pre_tokenizer
    # Only replace transformers' fallback; a pre-tokenizer it built on purpose is left alone.
    if current is None or type(current).__name__ == "ByteLevel":
        logger.debug("GGUF pre-tokenizer type %r: splitting digits before ByteLevel", pre_type)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
