#!/usr/bin/env python3
"""Draw the Grafana dashboard's panels (deploy/grafana/pagedllm.json) from a real Prometheus,
with matplotlib: each panel's queries run as range queries over the last minutes, laid out as
the dashboard lays them out. For docs/deploy.md's picture where no Grafana runs.

  python deploy/grafana/render_panels.py --prometheus http://127.0.0.1:9090 --minutes 10 \\
      --out docs/images/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DASHBOARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pagedllm.json")
SCALE = {"percentunit": (100.0, "%"), "s": (1000.0, "ms"), "reqps": (1.0, "req/s")}


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = {"query": expr, "start": start, "end": end, "step": step}
    body = httpx.get(prom + "/api/v1/query_range", params=params, timeout=30).json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--step", type=float, default=5)
    ap.add_argument("--out", default="dashboard.png")
    args = ap.parse_args()
    dashboard = json.load(open(DASHBOARD))
    panels = sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    end = time.time()
    start = end - args.minutes * 60
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    fig.patch.set_facecolor("#111217")
    for ax, panel in zip(axes.flat, panels):
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        factor, suffix = SCALE.get(unit, (1.0, ""))
        for target in panel["targets"]:
            for series in query_range(args.prometheus, target["expr"], start, end, args.step):
                xs = [(float(t) - end) / 60 for t, _ in series["values"]]
                ys = [float(v) * factor for _, v in series["values"]]
                ax.plot(xs, ys, label=legend(target["legendFormat"], series["metric"]))
        ax.set_title(panel["title"], color="#d8d9da", fontsize=11, loc="left")
        ax.set_facecolor("#181b1f")
        ax.tick_params(colors="#9fa7b3", labelsize=8)
        ax.grid(color="#2c3235", linewidth=0.6)
        ax.set_xlabel("minutes ago", color="#9fa7b3", fontsize=8)
        if suffix:
            ax.set_ylabel(suffix, color="#9fa7b3", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, facecolor="#181b1f", labelcolor="#d8d9da", loc="upper left")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(dashboard["title"], color="#d8d9da", x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90, facecolor=fig.get_facecolor())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
