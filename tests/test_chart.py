"""The Helm chart, checked without helm or a cluster (neither is on these machines).

* ``values.yaml`` validates against ``values.schema.json`` (what ``helm install`` enforces),
  and the schema refuses what the chart must not be given;
* every ``.Values`` path a template reads is defined in ``values.yaml``;
* ``helm/examples/`` (the chart rendered as plain manifests; CI re-renders them with helm
  and compares, see ``scripts/helm_examples.py``) validate against the Kubernetes OpenAPI
  schemas (``kubernetes-validate``, strict: unknown fields fail), and hold what matters:
  hardened pods, probes on the ports the config opens, a grace period above the drain time,
  a config that pacsfetch itself accepts, the dashboard as it is in the repository.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pacsfetch.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "pacsfetch"
EXAMPLES = ROOT / "helm" / "examples"
KUBERNETES_VERSION = "1.30"
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}
"""Custom resources (KEDA, Prometheus operator): not in the Kubernetes schemas."""


def _values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def _examples() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(EXAMPLES.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _by_kind_name(kind: str, name: str) -> dict[str, Any]:
    for _, doc in _examples():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no example {kind} {name}")


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(doc["metadata"]["name"], doc["spec"]["template"]["spec"]) for _, doc in _examples()
            if doc["kind"] in {"Deployment", "StatefulSet"}]


def test_values_validate_against_the_schema() -> None:
    schema = _schema()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(_values(), schema)


@pytest.mark.parametrize(("path", "value", "why"), [
    (("config",), "[worker]\nconcurrency = 9\n", "the chart writes [worker] itself"),
    (("worker", "drainSeconds"), 0, "drain time of at least a second"),
    (("worker", "metricsPort"), 80, "ports below 1024 need a capability the pods drop"),
    (("receiver", "aeTitle"), "A" * 17, "AE titles have at most 16 characters"),
    (("receiver", "service", "type"), "ExternalName", "a Service the PACS can reach"),
    (("receiver", "service", "externalTrafficPolicy"), "Nearest", "Local or Cluster"),
    (("worker", "autoscaling", "keda", "enbled"), True, "typos are refused"),
    (("networkPolicy", "pacsCidrs"), ["10.0.0.1"], "CIDR notation"),
])
def test_schema_refuses_bad_values(path: tuple[str, ...], value: Any, why: str) -> None:
    values = copy.deepcopy(_values())
    node = values
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(values, _schema())


def _defined(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_every_values_path_in_the_templates_is_defined() -> None:
    values = _values()
    used: dict[str, set[str]] = {}
    for template in sorted((CHART / "templates").glob("*")):
        for path in re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", template.read_text()):
            used.setdefault(path.lstrip("."), set()).add(template.name)
    assert len(used) > 40  # the pattern finds the paths at all
    missing = {path: sorted(files) for path, files in used.items() if not _defined(values, path)}
    assert missing == {}


def test_every_values_key_is_read_by_a_template() -> None:
    """The other direction: a value no template reads is a knob that does nothing."""
    text = "".join(t.read_text() for t in (CHART / "templates").glob("*"))
    unread = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            if f".Values.{path}" in text:
                continue
            if isinstance(value, dict) and value:
                walk(value, path)
            else:
                unread.append(path)

    walk(_values(), "")
    # Read through a variable ($scale := .Values.worker.autoscaling, $np := .Values.networkPolicy).
    indirect = {"worker.autoscaling": "$scale", "networkPolicy": "$np"}
    unread = [p for p in unread if not any(
        p.startswith(prefix + ".") and f"{var}.{p[len(prefix) + 1:]}" in text
        for prefix, var in indirect.items())]
    assert unread == []


@pytest.mark.parametrize(("name", "doc"), _examples(),
                         ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in _examples()])
def test_examples_validate_against_kubernetes_schemas(name: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in CUSTOM_KINDS:
        assert doc["apiVersion"] in {"keda.sh/v1alpha1", "monitoring.coreos.com/v1"}
        assert doc["metadata"]["name"].startswith("pacsfetch")
        return
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_validation_catches_a_broken_manifest() -> None:
    worker = copy.deepcopy(_by_kind_name("Deployment", "pacsfetch-worker"))
    worker["spec"]["template"]["spec"]["containers"][0]["prots"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSION, strict=True)


def test_dashboard_configmap_is_the_dashboard_in_the_repository() -> None:
    """After a dashboard change: python scripts/helm_examples.py dashboard."""
    configmap = _by_kind_name("ConfigMap", "pacsfetch-dashboard")
    shipped = json.loads((CHART / "dashboards" / "pacsfetch.json").read_text())
    assert json.loads(configmap["data"]["pacsfetch.json"]) == shipped
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    template = (CHART / "templates" / "monitoring.yaml").read_text()
    assert '.Files.Get "dashboards/pacsfetch.json"' in template


def _config_toml() -> str:
    return _by_kind_name("ConfigMap", "pacsfetch-config")["data"]["pacsfetch.toml"]


def test_configmap_is_a_config_pacsfetch_accepts() -> None:
    data = tomllib.loads(_config_toml())
    config = parse_config(data)
    values = _values()
    assert config.worker.drain_seconds == values["worker"]["drainSeconds"]
    assert config.metrics.worker_port == values["worker"]["metricsPort"]
    assert config.receiver.port == values["receiver"]["port"]


def test_every_pod_is_hardened_and_sized() -> None:
    for name, pod in _pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["requests"]["memory"], name
            assert container["resources"]["limits"]["memory"], name
        if name != "pacsfetch-redis":  # pacsfetch spools under /tmp: an emptyDir
            mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert "/tmp" in mounts, name


def test_probes_and_grace_periods_fit_the_config() -> None:
    config = parse_config(tomllib.loads(_config_toml()))
    for name, port in (("pacsfetch-worker", config.metrics.worker_port),
                       ("pacsfetch-receiver", config.metrics.receiver_port)):
        pod = _by_kind_name("Deployment", name)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == port
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert pod["terminationGracePeriodSeconds"] > config.worker.drain_seconds, name
    receiver = _by_kind_name("Deployment", "pacsfetch-receiver")["spec"]["template"]["spec"]
    assert {p["name"]: p["containerPort"] for p in receiver["containers"][0]["ports"]}[
        "dicom"] == config.receiver.port


def test_receiver_service_keeps_the_pacs_address() -> None:
    service = _by_kind_name("Service", "pacsfetch-receiver")
    assert service["spec"]["type"] in {"LoadBalancer", "NodePort"}
    assert service["spec"]["externalTrafficPolicy"] == "Local"


def test_scheduler_runs_exactly_one() -> None:
    scheduler = _by_kind_name("Deployment", "pacsfetch-scheduler")
    assert scheduler["spec"]["replicas"] == 1
    assert scheduler["spec"]["strategy"] == {"type": "Recreate"}


def test_workers_scale_on_every_priority_list_of_the_queue() -> None:
    from pacsfetch.queue import priority_queue_keys

    scaled = _by_kind_name("ScaledObject", "pacsfetch-worker")
    lists = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"]}
    assert lists == set(priority_queue_keys().values())
    assert scaled["spec"]["scaleTargetRef"]["name"] == "pacsfetch-worker"
    hpa = _by_kind_name("HorizontalPodAutoscaler", "pacsfetch-worker")
    from pacsfetch.metrics import QUEUE_MESSAGES

    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == QUEUE_MESSAGES


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis = _by_kind_name("StatefulSet", "pacsfetch-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "redis-data"


def test_image_is_multi_stage_non_root_with_one_entry_point() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s", dockerfile, re.M)
    assert len(stages) >= 2
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    assert 'ENTRYPOINT ["pacsfetch"]' in dockerfile
    values = _values()
    assert values["podSecurityContext"]["runAsUser"] == 10001  # the image's user


def test_compose_stack_runs_every_process_on_one_config_pacsfetch_accepts() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "orthanc", "api", "worker", "receiver", "prometheus",
            "grafana"} <= set(services)
    config = parse_config(tomllib.loads(
        (ROOT / "docker" / "compose" / "pacsfetch.toml").read_text()))
    assert services["worker"]["command"][0] == "worker"
    grace = int(services["worker"]["stop_grace_period"].rstrip("s"))
    assert grace > config.worker.drain_seconds
