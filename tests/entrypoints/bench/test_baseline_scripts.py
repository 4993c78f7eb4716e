"""benchmarks/hf_baselines.py, gemm_rate.py and decode_attention_bw.py, run in-process on tiny
inputs: the accounting (useful vs generated tokens, subsets) and the JSON they write."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _script(name: str):
    path = os.path.join(REPO_ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def short_workload(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hf") / "w.jsonl"
    lines = [("hello world", 2), ("The quick brown fox", 5), ("paged attention", 3), ("x", 4)]
    path.write_text("\n".join(json.dumps({"prompt": p, "output_len": n}) for p, n in lines))
    return str(path)


def test_hf_baselines_accounting(tiny_llama_dir, short_workload, tmp_path):
    out = tmp_path / "hf.json"
    rc = _script("hf_baselines").main(
        [
            "--model",
            tiny_llama_dir,
            "--dataset",
            short_workload,
            "--limit",
            "3",
            "--batch-size",
            "2",
            "--output-json",
            str(out),
            "--disable-tqdm",
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["subset"] == {"first_n": 3, "limit": 3}
    seq, static = result["modes"]["sequential"], result["modes"]["static"]
    assert seq["useful_output_tokens"] == static["useful_output_tokens"] == 2 + 5 + 3
    assert seq["generated_tokens"] == 10
    # Batches [2, 5] and [3]: the first runs 5 steps for both members.
    assert static["generated_tokens"] == 5 * 2 + 3
    assert seq["prompt_tokens"] == static["prompt_tokens"] > 0
    assert static["output_tokens_per_s"] == static["useful_output_tokens"] / static["elapsed_s"]


def test_hf_baselines_bad_dataset_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "output_len": -2}\n')
    assert _script("hf_baselines").main(["--dataset", str(bad)]) == 2
    assert f"{bad}:1:" in capsys.readouterr().err


def test_gemm_rate_smoke(tmp_path):
    out = tmp_path / "gemm.json"
    rc = _script("gemm_rate").main(
        [
            "--rows",
            "16",
            "--square",
            "64",
            "--dtypes",
            "float32",
            "--repeats",
            "2",
            "--min-time",
            "0.005",
            "--output-json",
            str(out),
            "--disable-tqdm",
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert [r["shape"] for r in result["results"]] == [
        "[16x576]@[576x1536]",
        "[16x1536]@[1536x576]",
        "[64]^3 square",
    ]
    assert result["peak_gflops"]["float32"] > 0
    assert result["smollm2_ceiling_tokens_per_s"]["float32"] > 0


def test_decode_attention_bw_smoke(ops, tmp_path):
    out = tmp_path / "bw.json"
    args = ["--batch", "3", "--context", "40", "--layers", "2", "--repeats", "2", "--isa", ops.isa]
    rc = _script("decode_attention_bw").main(
        args + ["--stream-mib", "8", "--output-json", str(out)]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["stream_read_gbps"] > 0
    for layout in ("scattered", "in_order"):
        r = result[layout]
        # 2 layers x 3 sequences x 40 tokens x 3 kv heads x 64 dims x (K and V) x 2 bytes
        assert r["kv_gb"] == pytest.approx(2 * 3 * 40 * 3 * 64 * 2 * 2 / 1e9)
        assert r["gbps"] == pytest.approx(r["kv_gb"] / (r["step_ms"] / 1e3))


def test_step_timeline_counts_every_step(tiny_llama_dir, short_workload, tmp_path):
    out = tmp_path / "steps.json"
    args = ["--model", tiny_llama_dir, "--dataset", short_workload, "--output-json", str(out)]
    assert _script("step_timeline").main(args + ["--max-num-batched-tokens", "8"]) == 0
    result = json.loads(out.read_text())
    steps, summary = result["steps"], result["summary"]
    # Outputs of 2, 5, 3 and 4 tokens: the first of each comes from its prefill step.
    assert sum(s["decodes"] for s in steps) == (2 - 1) + (5 - 1) + (3 - 1) + (4 - 1)
    assert max(s["prefill_tokens"] + s["decodes"] for s in steps) <= 8
    assert summary["prefill_steps"] + summary["decode_steps"] == len(steps)
    assert summary["prefill_s"] + summary["decode_s"] <= summary["wall_s"]


def test_step_timeline_fit_recovers_known_costs():
    fit_decode_steps = _script("step_timeline").fit_decode_steps
    steps = [
        {
            "seconds": (20 + 0.5 * b + 1.5 * ctx / 1e3) / 1e3,
            "decodes": b,
            "prefill_tokens": 0,
            "decode_context": ctx,
        }
        for b, ctx in [(1, 300), (8, 5000), (30, 9000), (64, 12000), (100, 50000), (5, 900)]
    ]
    steps.append({"seconds": 9.0, "decodes": 3, "prefill_tokens": 100, "decode_context": 400})
    fit = fit_decode_steps(steps)  # the prefill-carrying step is left out of the fit
    assert fit["fixed_ms"] == pytest.approx(20)
    assert fit["per_seq_ms"] == pytest.approx(0.5)
    assert fit["per_1k_ctx_ms"] == pytest.approx(1.5)
    assert fit["fixed_s"] == pytest.approx(6 * 20 / 1e3)
