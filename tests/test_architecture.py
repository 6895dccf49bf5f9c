"""Dependencies point inward: the API never imports DICOM code, workers or plugins; plugins
and workers never import the API; the core imports none of the outer layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "api": ("pynetdicom", "pydicom", "pacsfetch.workers", "pacsfetch.plugins"),
    # DIMSE runs on the project's own engine (plugins/dimse): pynetdicom is a test peer only.
    "workers": ("pacsfetch.api", "fastapi", "pynetdicom"),
    "plugins": ("pacsfetch.api", "pacsfetch.workers", "fastapi", "celery", "pynetdicom"),
    "pacsfetch": ("pacsfetch.api", "pacsfetch.workers", "pacsfetch.plugins", "pynetdicom", "pydicom"),
}
CORE_EXEMPT = {"cli.py", "__main__.py"}  # the CLI is the outermost shell, it wires layers


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer: str) -> None:
    files = [p for p in (ROOT / layer).rglob("*.py") if p.name not in CORE_EXEMPT or layer != "pacsfetch"]
    assert files, f"no Python files in {layer}/"
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imports_of(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer])
    }
    assert not offenders, sorted(offenders)
