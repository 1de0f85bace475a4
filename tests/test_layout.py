"""The package's shape: imports run one way (data, models -> train -> tune, bench, experiments -> cli), no module
imports another in a circle (lazy imports included), nothing uses Ray's private modules, and only ``raylsm``
is installed (``jobs/`` is an entry-point folder run from the working directory)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "raylsm"
# Lower number = lower layer; a module may import its own layer or below, never above.
LAYERS = {"config": 0, "storage": 0, "data": 1, "models": 1, "train": 2, "serving": 3, "tune": 3, "bench": 3,
          "experiments": 3, "cli": 4, "__main__": 5}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The raylsm modules ``path`` imports anywhere in it (a name imported from a package counts as its module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "raylsm":
                found.add(name)
    return found


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[1]]


def test_imports_run_down_the_layers_and_never_in_a_circle():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items() if m != "raylsm"}
    upward = [f"{m} -> {t}" for m, ts in graph.items() for t in ts
              if _layer(t) > _layer(m) and not modules[t].name == "__init__.py"]
    assert not upward, upward
    # Tarjan-free cycle search: depth-first with an explicit path
    circles = []
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    sys.setrecursionlimit(10_000)
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


def test_no_private_ray_modules_in_the_package():
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if "ray._private" in p.read_text()]
    assert not offenders, offenders


def test_only_raylsm_is_installed():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["raylsm*"]
