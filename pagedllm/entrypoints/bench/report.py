"""How bench results leave the process: a fixed-width table on stdout and a JSON file.

Every tool prints the same shape of table (as ``vllm bench`` does) so results paste into issues
side by side, and writes the same figures, unrounded, with ``--output-json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

WIDTH = 50


def format_table(title: str, rows: Sequence[tuple[str, Any]]) -> str:
    lines = [f" {title} ".center(WIDTH, "=")]
    for label, value in rows:
        if label.startswith("--"):  # a section heading
            lines.append(f" {label.strip('- ')} ".center(WIDTH, "-"))
            continue
        lines.append(f"{label + ':':<40}{_fmt(value):>10}")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def print_table(title: str, rows: Sequence[tuple[str, Any]]) -> None:
    print(format_table(title, rows), flush=True)


def write_json(path: str, obj: dict[str, Any]) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        # Two decimals for large figures, four for small ones (latencies in seconds).
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"
    return str(value)
