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


def _top_level_names(path: Path) -> set[str]:
    """What ``from module import name`` can take from the module at ``path``: its definitions, assignments and
    imports at module level (inside ``if``/``try`` blocks too), and for a package its submodules."""
    names: set[str] = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):
            body.extend(node.body + node.orelse + getattr(node, "finalbody", [])
                        + [s for h in getattr(node, "handlers", []) for s in h.body])
    if path.name == "__init__.py":
        names.update(p.stem if p.is_file() else p.name for p in path.parent.iterdir()
                     if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file())
    return names


def test_every_raylsm_import_names_something_that_exists():
    """A module moved or a function renamed must not leave a stale import behind anywhere, lazy imports and the
    entry points in ``jobs/`` included (nothing else imports ``jobs/demo.py`` before CI runs it)."""
    modules = _modules()
    exported = {m: _top_level_names(p) for m, p in modules.items()}
    stale = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "jobs").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                    node.module == "raylsm" or node.module.startswith("raylsm.")):
                if node.module not in modules:
                    stale.append(f"{path.relative_to(ROOT)}:{node.lineno}: no module {node.module}")
                    continue
                stale += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module} has no {a.name}"
                          for a in node.names if a.name != "*" and a.name not in exported[node.module]]
            elif isinstance(node, ast.Import):
                stale += [f"{path.relative_to(ROOT)}:{node.lineno}: no module {a.name}" for a in node.names
                          if a.name.startswith("raylsm.") and a.name not in modules]
    assert not stale, stale


def test_the_stale_import_check_sees_a_missing_name(tmp_path):
    """The check above, switched on a module that lacks the name: it must report it."""
    module = tmp_path / "m.py"
    module.write_text("from x import a\nif True:\n    b = 1\ndef c():\n    pass\n")
    assert _top_level_names(module) == {"a", "b", "c"}
    assert "ensure_ray" not in _top_level_names(PACKAGE / "train" / "run.py")
    assert "ensure_ray" in _top_level_names(PACKAGE / "train" / "cluster.py")
