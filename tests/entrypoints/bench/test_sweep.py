"""``bench sweep``: the CSV and PNG writers on synthetic results, the server lifecycle, and whole
sweeps against the fake server (given by URL, and started by the sweep itself)."""

from __future__ import annotations

import csv
import sys
import textwrap

import pytest

from pagedllm.entrypoints.bench import main
from pagedllm.entrypoints.bench.server_process import ServerProcess, free_port
from pagedllm.entrypoints.bench.sweep import parse_concurrencies, server_argv
from pagedllm.entrypoints.bench.sweep_report import CSV_COLUMNS, write_csv, write_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _synthetic_rows() -> list[dict]:
    rows = []
    for c in (1, 2, 4, 8):
        rows.append(
            {
                "max_concurrency": c,
                "num_prompts": 4 * c,
                "completed": 4 * c,
                "failed": 0,
                "duration": 10.0,
                "request_throughput": 0.4 * c,
                "request_goodput": None,
                "output_throughput": 50.0 * c**0.5,
                "total_token_throughput": 150.0 * c**0.5,
                "p95_ttft_ms": 100.0 * c,
                "median_ttft_ms": 80.0 * c,
                "extra_field": "ignored",
            }
        )
    return rows


def test_csv_writer(tmp_path):
    path = tmp_path / "sweep.csv"
    write_csv(str(path), _synthetic_rows())
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [int(r["max_concurrency"]) for r in rows] == [1, 2, 4, 8]
    assert float(rows[3]["p95_ttft_ms"]) == 800.0
    assert rows[0]["request_goodput"] == "" and rows[0]["mean_tpot_ms"] == ""


def test_plot_writer_makes_a_png(tmp_path):
    path = tmp_path / "sweep.png"
    write_plot(str(path), list(reversed(_synthetic_rows())), title="synthetic", ttft_slo_ms=500.0)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_parse_concurrencies():
    assert parse_concurrencies("4, 1,2,2") == [1, 2, 4]
    for bad in ("", "1,x", "0,2"):
        with pytest.raises(ValueError, match="concurrencies"):
            parse_concurrencies(bad)


def test_default_server_command_is_pagedllm_serve():
    from pagedllm.entrypoints.bench import build_parser

    ns = build_parser().parse_args(
        ["sweep", "--model", "/m", "--server-args", "--max-num-seqs 8 --dtype bfloat16"]
    )
    assert server_argv(ns, "127.0.0.1", 9) == [
        sys.executable,
        "-m",
        "pagedllm.entrypoints.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "9",
        "--model",
        "/m",
        "--max-num-seqs",
        "8",
        "--dtype",
        "bfloat16",
    ]
    ns.server_cmd = "vllm serve /models/x --port {port} --host {host}"
    assert server_argv(ns, "h", 5) == ["vllm", "serve", "/models/x", "--port", "5", "--host", "h"]


def test_server_process_that_dies_is_reported(tmp_path):
    server = ServerProcess(
        [sys.executable, "-c", "import sys; print('bad flag'); sys.exit(3)"],
        "http://127.0.0.1:1",
        str(tmp_path / "log"),
    )
    with pytest.raises(RuntimeError, match="exited with code 3"):
        server.start()
    assert "bad flag" in (tmp_path / "log").read_text()


def test_server_process_stops_with_sigterm(tmp_path):
    script = tmp_path / "health.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        from http.server import BaseHTTPRequestHandler, HTTPServer
        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404)
                self.end_headers()
        HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """)
    )
    port = free_port()
    with ServerProcess(
        [sys.executable, str(script), str(port)], f"http://127.0.0.1:{port}", str(tmp_path / "log")
    ) as server:
        proc = server.proc
        assert proc.poll() is None and server.startup_s is not None
    assert proc.returncode == -15  # SIGTERM


def _check_sweep_outputs(out_dir, levels):
    with open(out_dir / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["max_concurrency"]) for r in rows] == levels
    assert all(int(r["failed"]) == 0 for r in rows)
    assert (out_dir / "sweep.png").read_bytes().startswith(PNG_MAGIC)
    return rows


def test_sweep_against_a_running_server(fake_server, tmp_path):
    fake_server.state.ttft_s, fake_server.state.itl_s = 0.02, 0.005
    out = tmp_path / "sweep"
    rc = main(
        [
            "sweep",
            "--base-url",
            fake_server.base_url,
            "--concurrencies",
            "1,2,4",
            "--num-prompts",
            "4",
            "--prompts-per-concurrency",
            "2",
            "--input-len",
            "3",
            "--output-len",
            "4",
            "--goodput",
            "ttft:500",
            "--output-dir",
            str(out),
            "--disable-tqdm",
        ]
    )
    assert rc == 0
    rows = _check_sweep_outputs(out, [1, 2, 4])
    assert [int(r["num_prompts"]) for r in rows] == [4, 4, 8]
    assert [int(r["completed"]) for r in rows] == [4, 4, 8]
    assert (out / "serve_c4.json").exists()
    assert fake_server.state.max_in_flight == 4


def test_sweep_starts_and_stops_its_server(fake_server_script, tmp_path):
    out = tmp_path / "sweep"
    rc = main(
        [
            "sweep",
            "--server-cmd",
            f"{{python}} {fake_server_script} --host {{host}} --port {{port}} --itl 0.002",
            "--concurrencies",
            "1,2",
            "--num-prompts",
            "2",
            "--input-len",
            "3",
            "--output-len",
            "3",
            "--endpoint",
            "/v1/chat/completions",
            "--output-dir",
            str(out),
            "--disable-tqdm",
            "--server-startup-timeout",
            "60",
        ]
    )
    assert rc == 0
    _check_sweep_outputs(out, [1, 2])
    assert (out / "server.log").exists()
