"""Build the native kernels for every ISA this CPU runs (or those named):
``python -m pagedllm.model_executor.ops.build [avx2|avx512|avx512bf16|amx ...] [-v]``."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

from pagedllm.model_executor.ops.loader import ISAS, build, runnable_isas


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args
    isas = [a for a in args if a != "-v"] or list(runnable_isas())
    unknown = [a for a in isas if a not in ISAS]
    if unknown:
        print(f"unknown ISA {unknown[0]!r}: choose from {', '.join(ISAS)}", file=sys.stderr)
        return 2
    if not isas:
        print("this CPU runs none of the native ISAs; the torch backend serves it")
        return 0
    # ninja runs each build's compiles in parallel already; two builds at once overlap the
    # link and the slow files.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for path in pool.map(lambda isa: build(isa, verbose), isas):
            print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
