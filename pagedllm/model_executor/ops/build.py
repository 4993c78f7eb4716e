"""Build the native kernels: ``python -m pagedllm.model_executor.ops.build``."""

from __future__ import annotations

import sys

from pagedllm.model_executor.ops.loader import build


def main() -> int:
    path = build(verbose="-v" in sys.argv)
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
