"""The real Prometheus server (Debian package ``prometheus``; `make setup` installs it where apt
works) scrapes a running `pagedllm serve` on the default model while load runs, and every
PromQL expression of the Grafana dashboard (deploy/grafana/pagedllm.json, read from the file:
the queries tested are the dashboard's) and of the HPA's prometheus-adapter rule (read from the
rendered chart) returns a non-empty, plausible series through Prometheus' HTTP API."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from pagedllm.entrypoints.bench.server_process import free_port
from tests.entrypoints.openai.utils import wait_until

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy")
DASHBOARD = os.path.join(DEPLOY, "grafana", "pagedllm.json")
NAMESPACE, POD = "serving", "llm-pagedllm-0"


def dashboard_queries() -> dict[str, str]:
    """{"panel title :: legend": expr} for every target of every panel."""
    dashboard = json.load(open(DASHBOARD))
    return {
        f"{p['title']} :: {t['legendFormat']}": t["expr"]
        for p in dashboard["panels"]
        for t in p["targets"]
    }


def adapter_query() -> str:
    """The HPA's metric as prometheus-adapter asks Prometheus for it: the chart's rule with its
    template filled in for one pod."""
    from tests.deploy.test_helm_chart import by_kind, render

    config = by_kind(render({"autoscaling": {"enabled": True}}))["ConfigMap"]["data"]
    rule = yaml.safe_load(config["config.yaml"])["rules"][0]
    series = rule["seriesQuery"].split("{")[0]
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{POD}"')
        .replace("<<.GroupBy>>", "pod")
    )


def test_dashboard_covers_the_issue_panels():
    titles = {q.split(" :: ")[0] for q in dashboard_queries()}
    for needed in (
        "Tokens per second",
        "Requests running / waiting",
        "KV-cache usage",
        "Prefix-cache hit rate",
        "Time to first token",
        "Time per output token",
        "End-to-end request latency",
        "Preemptions per second",
        "Speculative decoding acceptance",
        "Errors by status",
    ):
        assert needed in titles, needed


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        msg = "the prometheus server is not installed (apt-get install prometheus; make setup)"
        if os.environ.get("CI"):  # CI installs it (make setup): a skip there would hide that
            pytest.fail(msg)
        print(msg)
        pytest.skip(msg)
    return found


def query(prom_url: str, expr: str) -> list[dict]:
    resp = httpx.get(prom_url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_every_dashboard_and_hpa_query_returns_data(prometheus_binary, tmp_path, default_gguf):
    port, prom_port = free_port(), free_port()
    server_log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "pagedllm"),
            "serve",
            default_gguf,
            "--port",
            str(port),
            "--kv-cache-memory",
            str(128 * 2**20),
            "--max-model-len",
            "1024",
            "--max-num-seqs",
            "8",
        ],
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "pagedllm",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{port}"],
                        # what Kubernetes service discovery would attach
                        "labels": {"namespace": NAMESPACE, "pod": POD},
                    }
                ],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen(
        [
            prometheus_binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=open(tmp_path / "prometheus.log", "w"),
        stderr=subprocess.STDOUT,
    )
    url, prom_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
    try:

        def ready() -> bool:
            assert server.poll() is None, open(tmp_path / "server.log").read()[-3000:]
            try:
                return httpx.get(url + "/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 180, "the server to be ready", interval=0.5)
        wait_until(lambda: query(prom_url, 'up{job="pagedllm"} == 1'), 60, "a scrape", interval=0.5)
        _send_load(url)
        time.sleep(3)  # a few scrapes after the load
        results = {name: query(prom_url, expr) for name, expr in dashboard_queries().items()}
        results["HPA"] = query(prom_url, adapter_query())
    finally:
        server.send_signal(signal.SIGTERM)
        prom.send_signal(signal.SIGTERM)
        server.wait(60)
        prom.wait(30)

    def value(name: str) -> float:
        series = results[name]
        assert series, f"{name}: no data"
        return sum(float(s["value"][1]) for s in series)

    for name, series in results.items():
        assert series, f"{name} returned no series"
    assert value("Tokens per second :: output tok/s") > 0
    assert value("Tokens per second :: prompt tok/s") > 0
    assert value("Requests running / waiting :: running") == 0  # all done
    assert value("Requests running / waiting :: waiting") == 0
    assert 0 <= value("KV-cache usage :: KV cache used") <= 1
    assert 0 < value("Prefix-cache hit rate :: hit rate") <= 1  # the shared system prompt
    assert 0 < value("Speculative decoding acceptance :: accepted / drafted") <= 1
    for panel in ("Time to first token", "Time per output token", "End-to-end request latency"):
        p50, p99 = value(f"{panel} :: p50"), value(f"{panel} :: p99")
        assert math.isfinite(p99) and 0 < p50 <= p99, (panel, p50, p99)
    assert value("Preemptions per second :: preemptions/s") >= 0
    errors = {
        s["metric"]["status"]: float(s["value"][1])
        for s in results["Errors by status :: {{status}}"]
    }
    assert errors.get("4xx", 0) > 0  # the bad requests sent
    rejected = {s["metric"]["reason"] for s in results["Errors by status :: rejected: {{reason}}"]}
    assert rejected == {"queue_full", "timeout"}
    finished = {
        s["metric"]["finished_reason"]: float(s["value"][1])
        for s in results["Finished requests by reason :: {{finished_reason}}"]
    }
    assert finished["length"] > 0
    hpa = results["HPA"]
    assert [s["metric"] for s in hpa] == [{"pod": POD}] and float(hpa[0]["value"][1]) == 0


def _send_load(url: str) -> None:
    """~10 s of 12 concurrent clients: a shared system prompt (prefix-cache hits), greedy
    repetitive text (n-gram drafts), some sampled, and a few bad requests (400s)."""
    system = "You are a helpful assistant. Answer briefly and precisely. " * 8
    stop_at = time.monotonic() + 10
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with httpx.Client(base_url=url, timeout=60) as http:
                n = 0
                while time.monotonic() < stop_at:
                    n += 1
                    if n % 5 == 1:  # the first, then every fifth
                        bad = http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
                        assert bad.status_code == 400
                        continue
                    body = {
                        "prompt": f"{system} List the numbers from 1 to 20, client {i}:",
                        "max_tokens": 32,
                        "temperature": 0.0 if i % 3 else 0.8,
                        "ignore_eos": True,
                    }
                    assert http.post("/v1/completions", json=body).status_code == 200
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # More 400s after the load: on a slow machine each client may get no further than its first
    # (bad) request before the load ends, all before the series' first scrape, and rate() reads
    # a counter that never moved after its first sample as 0.
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(3):
            assert (
                http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}).status_code
                == 400
            )
