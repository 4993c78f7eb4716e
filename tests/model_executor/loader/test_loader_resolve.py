"""resolve_model: local dirs and files, missing paths, hub ids offline, the default model."""

from __future__ import annotations

import os
import time

import huggingface_hub.constants
import pytest

from pagedllm.model_executor.loader import DEFAULT_MODEL_NAME, ModelSource, resolve_model
from pagedllm.model_executor.loader.default_model import DEFAULT_GGUF_FILENAME


def _touch(path: str, data: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_hf_directory(tmp_path):
    _touch(str(tmp_path / "config.json"), b"{}")
    _touch(str(tmp_path / "extra.gguf"), b"GGUF")  # config.json wins: it is an HF dir
    src = resolve_model(str(tmp_path))
    assert src == ModelSource(str(tmp_path), str(tmp_path), None)
    assert not src.is_gguf


def test_gguf_file_and_directory_with_one_gguf(tmp_path):
    gguf = _touch(str(tmp_path / "m.gguf"), b"GGUF")
    for model in (gguf, str(tmp_path)):
        src = resolve_model(model)
        assert src.is_gguf and src.gguf_file == gguf and src.path == gguf and src.model == model


def test_relative_gguf_path_becomes_absolute(tmp_path, monkeypatch):
    _touch(str(tmp_path / "m.gguf"), b"GGUF")
    monkeypatch.chdir(tmp_path)
    src = resolve_model("./m.gguf")
    assert src.gguf_file == str(tmp_path / "m.gguf")
    assert os.path.isabs(src.path)


def test_gguf_detected_by_magic_without_suffix(tmp_path):
    path = _touch(str(tmp_path / "weights.bin"), b"GGUF\x03\x00\x00\x00")
    assert resolve_model(path).gguf_file == path
    other = _touch(str(tmp_path / "notes.txt"), b"hello")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(other)


def test_directory_without_model(tmp_path):
    with pytest.raises(ValueError, match="neither a config.json nor a .gguf"):
        resolve_model(str(tmp_path))
    _touch(str(tmp_path / "a.gguf"))
    _touch(str(tmp_path / "b.gguf"))
    with pytest.raises(ValueError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize(
    "model",
    ["/nonexistent/dir/model", "./missing-model", "~/missing-model-xyz", "missing.gguf", "a/b/c"],
)
def test_missing_local_path(model):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        resolve_model(model)
    assert repr(model) in str(info.value)


def test_unknown_repo_id_offline_fails_fast(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import time, so patch the constant as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ValueError) as info:
        resolve_model("pagedllm-test-owner/no-such-model-xyz")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "could not download model 'pagedllm-test-owner/no-such-model-xyz'" in message
    assert "pass a local directory or .gguf file" in message
    assert info.value.__cause__ is not None


def test_default_model(default_gguf_path):
    cache_dir = os.path.dirname(default_gguf_path)
    for model in (None, ""):
        src = resolve_model(model, cache_dir=cache_dir)
        assert src.model == DEFAULT_MODEL_NAME
        assert src.gguf_file == src.path == os.path.join(cache_dir, DEFAULT_GGUF_FILENAME)
