"""deploy/helm/pagedllm renders with Helm itself (the Helm v4 Go SDK, through helm-python-sdk)
and every object it renders validates strictly against the Kubernetes schemas
(kubernetes-validate), with the default values, with tensor/data parallelism, and with every
option on; values.schema.json turns bad values away. The probes point at the server's real
endpoints, the grace period covers the drain."""

from __future__ import annotations

import os

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "helm", "pagedllm")
K8S_VERSION = "1.33.0"
# Custom resources kubernetes-validate has no schema for (the Prometheus Operator's).
CUSTOM_KINDS = {"ServiceMonitor"}

VALUE_SETS = {
    "defaults": {},
    "tp2-dp2": {"tensorParallelSize": 2, "dataParallelSize": 2},
    "everything": {
        "model": "/cache/models/my-model",
        "servedModelName": "my-model",
        "apiKeySecret": "pagedllm-key",
        "extraEnv": [{"name": "PAGEDLLM_LOG_LEVEL", "value": "DEBUG"}],
        "extraArgs": ["--deterministic"],
        "modelCache": {"persistent": True, "size": "50Gi", "storageClassName": "fast"},
        "autoscaling": {"enabled": True, "maxReplicas": 8},
        "serviceMonitor": {"enabled": True},
        "metricsPrefix": "both",
    },
}


def render(values: dict) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="llm", namespace="serving")
    objects = []
    for text in manifests.values():
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objects}


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_chart_renders_and_validates_strictly(name):
    objects = render(VALUE_SETS[name])
    kinds = by_kind(objects)
    assert {"Deployment", "Service", "PodDisruptionBudget"} <= set(kinds)
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises if invalid
    if name == "everything":
        assert {"HorizontalPodAutoscaler", "PersistentVolumeClaim", "ServiceMonitor"} <= set(kinds)
        monitor = kinds["ServiceMonitor"]  # no schema here: its shape, checked by hand
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["endpoints"] == [
            {"port": "http", "path": "/metrics", "interval": "15s"}
        ]
        assert (
            monitor["spec"]["selector"]["matchLabels"]
            == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
        )


def test_deployment_probes_args_and_drain():
    objects = render(VALUE_SETS["tp2-dp2"])
    pod = by_kind(objects)["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    args = container["args"]
    for flag, value in (
        ("--tensor-parallel-size", "2"),
        ("--data-parallel-size", "2"),
        ("--shutdown-timeout", "30"),
    ):
        assert args[args.index(flag) + 1] == value
    # traffic stops before the drain starts, and the pod is killed only after the drain
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] == 5
    assert pod["terminationGracePeriodSeconds"] > 5 + 30
    # these flags exist: the server's parser accepts the chart's arguments
    from pagedllm.entrypoints.openai.cli_args import make_arg_parser

    make_arg_parser().parse_args(args)


def test_hpa_scales_on_the_waiting_queue():
    kinds = by_kind(render(VALUE_SETS["everything"]))
    metric = kinds["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]
    assert metric["metric"]["name"] == "pagedllm_num_requests_waiting"
    rule = yaml.safe_load(kinds["ConfigMap"]["data"]["config.yaml"])["rules"][0]
    assert rule["name"]["as"] == "pagedllm_num_requests_waiting"
    assert rule["seriesQuery"].startswith("pagedllm:num_requests_waiting{")


@pytest.mark.parametrize(
    "values,complaint",
    [
        ({"maxNumSeqs": 0}, "maxNumSeqs"),
        ({"metricsPrefix": "prom"}, "metricsPrefix"),
        ({"probes": {"startup": {"periodSeconds": "10"}}}, "periodSeconds"),
        ({"maxModelLenn": 2048}, "maxModelLenn"),
    ],
)
def test_values_schema_refuses_bad_values(values, complaint):
    with pytest.raises(helm.HelmError, match=complaint):
        render(values)
