"""Keep ``helm/examples/`` (the chart rendered as plain manifests) in step with the chart.

    python scripts/helm_examples.py dashboard      # rewrite examples/dashboard.yaml (no helm needed)
    python scripts/helm_examples.py check [FILE..] # with helm: render each example's command, compare
    python scripts/helm_examples.py write [FILE..] # with helm: rewrite the examples from the chart

Each example file starts with the ``helm template`` command that renders it. ``check``
compares object by object (kind and name), ignoring the config checksum annotation, and
fails naming the first difference; the CI workflow runs it where helm is installed. The
dashboard ConfigMap is pure data, so it is regenerated here too, and tests/test_chart.py
fails when it no longer matches ``helm/pacsfetch/dashboards/pacsfetch.json``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "pacsfetch"
EXAMPLES = ROOT / "helm" / "examples"
DASHBOARD = CHART / "dashboards" / "pacsfetch.json"
COMMAND_PREFIX = "# Rendered by: "
DEFAULT_COMMAND = "helm template pacsfetch helm/pacsfetch"
CHECKSUM = "checksum/config"


def dashboard_configmap() -> dict[str, Any]:
    """The ConfigMap templates/monitoring.yaml renders for the dashboard (default values)."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "pacsfetch-dashboard", "labels": {
            "app.kubernetes.io/name": "pacsfetch",
            "app.kubernetes.io/instance": "pacsfetch",
            "app.kubernetes.io/version": str(chart["appVersion"]),
            "app.kubernetes.io/managed-by": "Helm",
            "app.kubernetes.io/component": "metrics",
            "helm.sh/chart": f"pacsfetch-{chart['version']}",
            "grafana_dashboard": "1",
        }},
        "data": {"pacsfetch.json": DASHBOARD.read_text().strip()},
    }


def write_dashboard() -> Path:
    path = EXAMPLES / "dashboard.yaml"
    path.write_text(f"{COMMAND_PREFIX}{DEFAULT_COMMAND}\n"
                    + yaml.safe_dump(dashboard_configmap(), sort_keys=False, width=100))
    return path


def command_of(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    if not first.startswith(COMMAND_PREFIX):
        raise SystemExit(f"{path}: first line must be '{COMMAND_PREFIX}helm template ...'")
    return shlex.split(first[len(COMMAND_PREFIX):])


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _normal(doc: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    annotations = doc.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations")
    if annotations:
        annotations.pop(CHECKSUM, None)
    return doc


def render(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    out = subprocess.run(command_of(path), cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    return {_key(d): d for d in yaml.safe_load_all(out) if d}


def check(paths: list[Path]) -> int:
    failures = 0
    for path in paths:
        rendered = render(path)
        for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
            got = rendered.get(_key(doc))
            if got is None:
                print(f"{path.name}: the chart renders no {_key(doc)}")
                failures += 1
            elif _normal(got) != _normal(doc):
                print(f"{path.name}: {_key(doc)} differs from the chart's rendering; "
                      "run: python scripts/helm_examples.py write")
                failures += 1
    return 1 if failures else 0


def write(paths: list[Path]) -> None:
    for path in paths:
        rendered = render(path)
        keys = [_key(d) for d in yaml.safe_load_all(path.read_text()) if d]
        header = path.read_text().splitlines()[0]
        path.write_text(header + "\n" + "---\n".join(
            yaml.safe_dump(rendered[k], sort_keys=False, width=100) for k in keys))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"dashboard", "check", "write"}:
        print(__doc__)
        return 2
    if argv[0] == "dashboard":
        print(write_dashboard().relative_to(ROOT))
        return 0
    paths = [Path(p) for p in argv[1:]] or sorted(EXAMPLES.glob("*.yaml"))
    if argv[0] == "check":
        return check(paths)
    write(paths)
    write_dashboard()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
