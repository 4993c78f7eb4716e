"""deploy/docker/Dockerfile is hadolint-clean, and the command the image runs works: no Docker
daemon runs here, so the image itself is not built; instead its ENTRYPOINT (plus a port) runs
as a process with the image's environment (kernels and model cache in separate folders), its
HEALTHCHECK command passes once the model is ready, it serves a request, and SIGTERM stops it
with status 0. The compose file's parts fit together (Prometheus' own promtool checks its
config where Prometheus is installed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import httpx
import pytest
import yaml

from pagedllm import envs
from pagedllm.entrypoints.bench.server_process import free_port
from tests.entrypoints.openai.utils import wait_until

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy")
DOCKERFILE = os.path.join(DEPLOY, "docker", "Dockerfile")
COMPOSE = os.path.join(DEPLOY, "compose")


def test_dockerfile_is_hadolint_clean():
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", DOCKERFILE], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _instruction(text: str, name: str) -> str:
    """The last NAME instruction, continuation lines joined."""
    joined = text.replace("\\\n", " ")
    found = re.findall(rf"^{name}\s+(.*)$", joined, flags=re.M)
    assert found, name
    return found[-1]


def test_the_image_start_command_serves(tmp_path, default_gguf):
    text = open(DOCKERFILE).read()
    entrypoint = json.loads(_instruction(text, "ENTRYPOINT"))
    assert entrypoint[:2] == ["pagedllm", "serve"]
    health = _instruction(text, "HEALTHCHECK")
    check = json.loads(health[health.index("CMD") + 3 :].strip())
    # As in the image: kernels in PAGEDLLM_KERNEL_DIR (here: the ones this checkout built), the
    # model cache elsewhere (the /cache volume; here the default model's folder).
    port = free_port()
    env = {
        **os.environ,
        "PAGEDLLM_KERNEL_DIR": envs.kernel_dir(),
        "PAGEDLLM_CACHE_DIR": envs.cache_dir(),
        "HF_HOME": str(tmp_path / "hf"),
    }
    argv = [
        os.path.join(os.path.dirname(sys.executable), entrypoint[0]),
        *entrypoint[1:],
        "--port",
        str(port),
        "--kv-cache-memory",
        str(64 * 2**20),
        "--max-model-len",
        "512",
    ]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    healthcheck = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in check]
    try:

        def ready() -> bool:
            assert proc.poll() is None, open(tmp_path / "server.log").read()[-3000:]
            return subprocess.run(healthcheck, capture_output=True).returncode == 0

        wait_until(ready, 180, "the HEALTHCHECK command to pass", interval=0.5)
        resp = httpx.post(
            url + "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4}
        )
        assert resp.status_code == 200, resp.text
        assert httpx.get(url + "/live").status_code == 200
        log_text = open(tmp_path / "server.log").read()
        # the kernels load
        assert re.search(r"backend: (avx2|avx512|avx512bf16|amx)", log_text), log_text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0


def test_compose_parts_fit_together():
    compose = yaml.safe_load(open(os.path.join(COMPOSE, "docker-compose.yml")))
    services = compose["services"]
    assert {"pagedllm", "prometheus", "grafana"} <= set(services)
    assert services["pagedllm"]["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert os.path.exists(
        os.path.join(COMPOSE, services["pagedllm"]["build"]["context"], "deploy/docker/Dockerfile")
    )
    prom = yaml.safe_load(open(os.path.join(COMPOSE, "prometheus.yml")))
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["pagedllm:8000"]  # the service name and the port the image serves on
    # Grafana: the provisioned dashboards folder is where the compose file mounts ours
    provider = yaml.safe_load(
        open(os.path.join(COMPOSE, "grafana-provisioning/dashboards/pagedllm.yml"))
    )
    folder = provider["providers"][0]["options"]["path"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in services["grafana"]["volumes"])
    host_dir = next(h for h, c in mounts.items() if c == folder)
    assert os.path.exists(os.path.join(COMPOSE, host_dir, "pagedllm.json"))
    datasource = yaml.safe_load(
        open(os.path.join(COMPOSE, "grafana-provisioning/datasources/prometheus.yml"))
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed: `make setup` adds it")
    result = subprocess.run(
        [promtool, "check", "config", os.path.join(COMPOSE, "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
