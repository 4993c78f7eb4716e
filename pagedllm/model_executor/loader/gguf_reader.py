"""Open GGUF files with gguf-py (any parse failure -> one clear ValueError) and read metadata."""

from __future__ import annotations

import functools
import os
from typing import Any

from gguf import GGUFReader, GGUFValueType

# Arrays this long are token tables (tokens, merges, scores, token types): slow to decode and not
# metadata anyone here needs.
_MAX_ARRAY_LEN = 4096


def invalid_gguf_error(path: str, err: BaseException) -> ValueError:
    return ValueError(f"{path} is not a valid GGUF file ({type(err).__name__}: {err})")


def open_gguf(path: str) -> GGUFReader:
    """Parse the header of a GGUF file (tensor data stays memory-mapped); the last file parsed
    is kept (the tokenizer and the weights read the same one, and a 262k-token vocabulary takes
    gguf-py seconds to parse).

    gguf-py reports bad files as ValueError, IndexError, struct or numpy errors depending on where
    the bytes go wrong; callers get one ValueError naming the file instead.
    """
    stat = os.stat(path)
    return _open_gguf(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _open_gguf(path: str, size: int, mtime_ns: int) -> GGUFReader:
    try:
        reader = GGUFReader(path)
        _check_tensor_extents(reader, os.path.getsize(path))
    except OSError:
        raise
    except Exception as err:
        raise invalid_gguf_error(path, err) from err
    return reader


def gguf_load_error(path: str, what: str, err: Exception) -> ValueError:
    """The error to raise when transformers fails on a GGUF file.

    transformers raises whatever its parser hits on a broken file (struct errors, IndexError, ...);
    re-reading the header with gguf-py tells "not a GGUF file" apart from "valid file, unsupported
    content", and both become a ValueError naming the file.
    """
    try:
        open_gguf(path)
    except ValueError as invalid:
        return invalid
    return ValueError(f"could not read {what} from GGUF file {path} ({type(err).__name__}: {err})")


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata key -> value, except the huge token arrays of the tokenizer."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if (
            field.types
            and field.types[0] == GGUFValueType.ARRAY
            and len(field.data) > _MAX_ARRAY_LEN
        ):
            continue
        meta[key] = field.contents()
    return meta


def _check_tensor_extents(reader: GGUFReader, file_size: int) -> None:
    """gguf-py usually notices a truncated file while mapping tensors; make sure it always does."""
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > file_size:
            raise ValueError(f"tensor {tensor.name} ends at byte {end}, past the end of the file")
