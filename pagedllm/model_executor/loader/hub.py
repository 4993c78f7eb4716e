"""Download a model repo from the Hugging Face hub (config, tokenizer, safetensors weights)."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# What the engine reads from an HF repo; skips duplicate weight formats (*.bin, *.pt, *.gguf, onnx).
_ALLOW_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt")


def download_from_hub(repo_id: str, *, revision: str | None = None) -> str:
    """Return the local snapshot directory of ``repo_id``, downloading what is missing.

    Honors HF_HUB_OFFLINE / HF_HOME like any huggingface_hub client. Any failure (offline, no such
    repo, gated repo, network error) becomes a ValueError that tells the user what to do instead.
    """
    # Imported here: huggingface_hub is only needed for hub models, and it reads its env at import.
    from huggingface_hub import snapshot_download

    logger.info("fetching model %s (revision %s) from the Hugging Face hub", repo_id, revision)
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=list(_ALLOW_PATTERNS))
    except Exception as err:  # offline, not found, auth, network, invalid id: all the same to us
        raise ValueError(
            f"could not download model {repo_id!r} from the Hugging Face hub"
            f" ({type(err).__name__}: {_first_line(err)}): pass a local directory or .gguf file"
        ) from err


def _first_line(err: BaseException, limit: int = 300) -> str:
    """hub errors can span many lines (URLs, request ids); one line is enough in our message."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else ""
