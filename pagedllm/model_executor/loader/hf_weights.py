"""Stream the tensors of an HF checkpoint directory (safetensors, else pytorch_model*.bin)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open


def iter_hf_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) exactly as stored, file by file; the caller converts dtypes."""
    shards = checkpoint_files(model_dir, "model.safetensors", "*.safetensors")
    if shards:
        for shard in shards:
            yield from _iter_safetensors(shard)
        return
    shards = checkpoint_files(model_dir, "pytorch_model.bin", "pytorch_model*.bin")
    if shards:
        for shard in shards:
            yield from _iter_torch_bin(shard)
        return
    raise ValueError(
        f"model directory {model_dir} has no weights (*.safetensors or pytorch_model*.bin)"
    )


def checkpoint_files(model_dir: str, single: str, pattern: str) -> list[str]:
    """The files of one checkpoint: those its index names, else ``single``, else all matching.

    The index (or the canonical single file) wins over a glob because repos sometimes ship the same
    weights twice in another layout (e.g. Mistral's consolidated.safetensors).
    """
    index = os.path.join(model_dir, f"{single}.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
        missing = [path for path in files if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    if os.path.isfile(os.path.join(model_dir, single)):
        return [os.path.join(model_dir, single)]
    return sorted(glob.glob(os.path.join(model_dir, pattern)))


def _iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        handle = safe_open(path, "pt")
    except Exception as err:  # safetensors raises its own SafetensorError for bad headers
        raise ValueError(f"{path} is not a valid safetensors file ({err})") from err
    with handle as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _iter_torch_bin(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    # weights_only: a .bin is a pickle, and unpickling arbitrary objects would run arbitrary code.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    yield from state.items()
