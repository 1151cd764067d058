"""The packages depend one way: edge_client <- model <- privacy <- federation <- aggregator <- simulations
<- experiments <- rib_edge. Every import counts, lazy ones inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    "edge_client",
    "model",
    "privacy",
    "federation",
    "aggregator",
    "simulations",
    "experiments",
    "rib_edge",
]
# The device runtime must run on a base install (numpy, onnxruntime, cryptography).
DEVICE_FORBIDDEN = (
    "torch",
    "opacus",
    "flwr",
    "pandas",
    "pyarrow",
    "gensim",
    "implicit",
    "scipy",
    "matplotlib",
)
# The server never imports the device's training module (nor the ClientApp built on it).
SERVER_FORBIDDEN = ("federation.training", "federation.client_app")


def imports_of(path: Path) -> list[str]:
    """Every module an import statement in ``path`` names (absolute imports only; the tree uses no others)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []


@pytest.mark.parametrize("package", LAYERS)
def test_a_package_imports_only_the_layers_below_it(package):
    allowed = set(LAYERS[: LAYERS.index(package) + 1])
    bad = []
    for path in modules(package):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in LAYERS and top not in allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_nothing_on_the_device_imports_training_libraries():
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules("edge_client")
        for name in imports_of(path)
        if name.split(".")[0] in DEVICE_FORBIDDEN
    ]
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_server_never_imports_device_training():
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules("aggregator")
        for name in imports_of(path)
        if name.startswith(SERVER_FORBIDDEN)
    ]
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_layering_test_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from federation.training import DeviceTrainer\n    import torch\n")
    assert "federation.training" in imports_of(module) and "torch" in imports_of(module)
