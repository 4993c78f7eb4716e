"""``bench throughput`` and ``bench latency`` end to end on the tiny random-weight Llama."""

from __future__ import annotations

import json

from pagedllm.entrypoints.bench import main

SMALL_ENGINE = ["--num-kv-blocks", "64", "--max-model-len", "256"]


def test_throughput_random_dataset(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    rc = main(
        [
            "throughput",
            "--model",
            tiny_llama_dir,
            "--dataset",
            "random",
            "--input-len",
            "16",
            "--output-len",
            "8",
            "--num-prompts",
            "4",
            "--output-json",
            str(out),
            "--disable-tqdm",
            *SMALL_ENGINE,
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["num_requests"] == 4
    assert result["prompt_tokens"] == 64
    assert result["output_tokens"] == result["expected_output_tokens"] == 32
    assert result["elapsed_s"] > 0 and result["load_s"] > 0
    assert result["output_tokens_per_s"] == 32 / result["elapsed_s"]
    assert result["total_tokens_per_s"] == 96 / result["elapsed_s"]
    assert result["achieved_gflops"] > 0
    assert result["engine_args"]["num_kv_blocks"] == 64
    assert "Offline Throughput" in capsys.readouterr().out


def test_throughput_file_dataset_yields_each_output_len(tiny_llama_dir, tmp_path):
    data = tmp_path / "w.jsonl"
    lines = [
        {"prompt": "The quick brown fox", "output_len": 3},
        {"prompt": "hello world", "output_len": 9, "prompt_len": 2},
        {"prompt": "never used", "output_len": 5},
    ]
    data.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "t.json"
    rc = main(
        [
            "throughput",
            "--model",
            tiny_llama_dir,
            "--dataset",
            str(data),
            "--num-prompts",
            "2",
            "--num-warmup-requests",
            "0",
            "--peak-gflops",
            "100",
            "--output-json",
            str(out),
            "--disable-tqdm",
            *SMALL_ENGINE,
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["num_requests"] == 2 and result["output_tokens"] == 12
    assert result["fraction_of_peak"] == result["achieved_gflops"] / 100


def test_latency(tiny_llama_dir, tmp_path):
    out = tmp_path / "latency.json"
    rc = main(
        [
            "latency",
            "--model",
            tiny_llama_dir,
            "--batch-size",
            "2",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--num-iters-warmup",
            "1",
            "--num-iters",
            "3",
            "--output-json",
            str(out),
            "--disable-tqdm",
            *SMALL_ENGINE,
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert len(result["latencies_s"]) == 3
    assert min(result["latencies_s"]) <= result["percentiles_s"]["50"] <= max(result["latencies_s"])
    assert result["ms_per_output_token"] == result["avg_latency_s"] * 1000 / 4


def test_bad_engine_flag_exits_2_before_loading(capsys):
    assert main(["throughput", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs" in capsys.readouterr().err
