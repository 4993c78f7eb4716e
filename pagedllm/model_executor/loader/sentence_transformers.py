"""Read a sentence-transformers model directory's own description of its embeddings:
modules.json lists the modules after the transformer (Pooling, Normalize), 1_Pooling/config.json
the pooling mode, sentence_bert_config.json the length it was trained for."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

# sentence-transformers' pooling_mode_* flags -> our pooling types
_MODES = {
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_cls_token": "CLS",
    "pooling_mode_lasttoken": "LAST",
}
_UNSUPPORTED_MODES = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class SentenceTransformersConfig:
    pooling_type: str | None
    normalize: bool
    max_seq_length: int | None


def read_sentence_transformers_config(model_dir: str) -> SentenceTransformersConfig | None:
    """None when ``model_dir`` is not a sentence-transformers model (no modules.json).
    ValueError for modules pagedllm does not run (a Dense projection, max pooling), rather
    than embeddings that silently differ from the model's."""
    path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        modules = json.load(f)
    pooling_type, normalize = None, False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _KNOWN_MODULES:
            raise ValueError(
                f"{path}: module {module.get('type')!r} is not supported (supported: "
                f"{', '.join(_KNOWN_MODULES)})"
            )
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            pooling_type = _pooling_type(os.path.join(model_dir, module.get("path", "")))
    max_len = None
    bert_config = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.isfile(bert_config):
        with open(bert_config) as f:
            max_len = json.load(f).get("max_seq_length")
    return SentenceTransformersConfig(pooling_type, normalize, max_len)


def _pooling_type(pooling_dir: str) -> str:
    path = os.path.join(pooling_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    if config.get("pooling_mode"):  # newer files name the mode directly
        mode = str(config["pooling_mode"]).lower()
        named = {"mean": "MEAN", "cls": "CLS", "lasttoken": "LAST"}
        if mode not in named:
            raise ValueError(f"{path}: pooling_mode {mode!r} is not supported")
        return named[mode]
    modes = [ours for flag, ours in _MODES.items() if config.get(flag)]
    unsupported = [flag for flag in _UNSUPPORTED_MODES if config.get(flag)]
    if unsupported or len(modes) != 1:
        raise ValueError(
            f"{path}: pooling {unsupported or modes or 'none'} is not supported (one of "
            f"{', '.join(_MODES)})"
        )
    return modes[0]
