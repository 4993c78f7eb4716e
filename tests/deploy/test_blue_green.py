"""A blue-green update with no failed request (docs/deploy.md): 16 clients stream completions
through a router (the load balancer's part) while the old server (blue) serves; the new one
(green) starts, the router moves new requests to it once its /ready says 200, blue gets SIGTERM
and drains the streams it still runs. Every request completes; both servers served some."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from pagedllm.entrypoints.bench.server_process import free_port
from tests.entrypoints.openai.utils import wait_until

CLIENTS = 16


def start(model_dir: str, log_path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [
        os.path.join(os.path.dirname(sys.executable), "pagedllm"),
        "serve",
        model_dir,
        "--port",
        str(port),
        "--kv-cache-memory",
        str(16 * 2**20),
        "--shutdown-timeout",
        "30",
    ]
    proc = subprocess.Popen(argv, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def is_ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_blue_green_update_loses_no_request(tiny_llama_dir, tmp_path):
    blue, blue_url = start(tiny_llama_dir, tmp_path / "blue.log")
    green = None
    try:
        wait_until(lambda: is_ready(blue_url), 120, "blue to be ready", interval=0.2)
        route = {"url": blue_url}  # the router: where new requests go
        stop = threading.Event()
        served: dict[str, int] = {blue_url: 0}
        failures: list[str] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            body = {"prompt": f"client {i} says", "max_tokens": 48, "stream": True}
            body["ignore_eos"] = True
            while not stop.is_set():
                url = route["url"]
                try:
                    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                        events = [e for e in r.iter_lines() if e.startswith("data: ")]
                    ok = r.status_code == 200 and events[-1] == "data: [DONE]"
                    ok = ok and "error" not in json.loads(events[-2][6:])
                    if not ok:
                        failures.append(f"{url}: {r.status_code} {events[-2:]}")
                except (httpx.HTTPError, IndexError, ValueError) as exc:
                    failures.append(f"{url}: {exc!r}")
                    continue
                with lock:
                    served[url] = served.get(url, 0) + 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        wait_until(lambda: served[blue_url] >= CLIENTS, 60, "blue to serve traffic")
        # 1. green starts beside blue and warms up
        green, green_url = start(tiny_llama_dir, tmp_path / "green.log")
        wait_until(lambda: is_ready(green_url), 120, "green to be ready", interval=0.2)
        # 2. the router sends new requests to green; requests already on their way to blue
        # arrive before it stops taking them (in Kubernetes: the chart's preStop sleep)
        route["url"] = green_url
        time.sleep(2)
        # 3. blue drains what it still runs, then exits
        blue.send_signal(signal.SIGTERM)
        assert blue.wait(60) == 0
        wait_until(lambda: served.get(green_url, 0) >= 2 * CLIENTS, 60, "green to serve")
        stop.set()
        for t in threads:
            t.join(60)
        assert not failures, failures[:5]
        assert served[blue_url] >= CLIENTS and served[green_url] >= 2 * CLIENTS
        assert is_ready(green_url)
    finally:
        for proc in (blue, green):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
