"""The model package imports in one direction only, each module alone, and the daemon sees only its surface.

Dependency order (docs/contracts.md): spec <- scoring <- cnn <- checkpoint; onnx beside them on
spec and scoring (cnn and checkpoint only inside its export functions); `earshot.model` itself on
spec and scoring (checkpoint and onnx only inside `load_model`). Checked two ways: every import
statement of every module against that table (ast), and every module imported alone in a fresh
interpreter (an import cycle, or a name used before it is defined, fails there).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "daemon" / "earshot"
MODEL = PKG / "model"

# Package modules each module may import at module level, and (second table) inside functions.
TOP: dict[str, set[str]] = {
    "__init__": {"spec", "scoring", "cascade"},
    "spec": set(),
    "scoring": {"spec"},
    "cnn": {"spec", "scoring"},
    "checkpoint": {"spec", "scoring", "cnn", "confirm"},
    "onnx": {"spec", "scoring", "ortsession"},
    "mn": {"mnfeatures"},
    "confirm": {"mn", "mnfeatures", "cascade"},
    "cascade": set(),
    "mnfeatures": set(),
    "confirm_onnx": {"mnfeatures", "spec", "ortsession", "cascade"},
    "ortsession": set(),
}
LAZY: dict[str, set[str]] = {
    "__init__": {"checkpoint", "onnx"},
    "onnx": {"cnn", "checkpoint", "confirm_onnx"},
}
TORCH_FREE = ("__init__", "spec", "scoring", "onnx", "cascade", "mnfeatures", "confirm_onnx", "ortsession")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(absolute module imported, at module level?, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    # Imports under `if TYPE_CHECKING:` never run; leave them out.
    skip = {id(n) for s in tree.body if isinstance(s, ast.If) and "TYPE_CHECKING" in ast.unparse(s.test)
            for n in ast.walk(s)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top_level, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, id(node) in top_level, node.lineno))
            # `from earshot.model import spec` imports the submodule spec.
            for a in node.names:
                if mod == "earshot.model" and a.name in TOP:
                    out.append((f"earshot.model.{a.name}", id(node) in top_level, node.lineno))
    return out


def test_the_package_has_exactly_the_modules_the_table_names() -> None:
    assert {p.stem for p in MODEL.glob("*.py")} == set(TOP)


@pytest.mark.parametrize("name", sorted(TOP))
def test_imports_follow_the_allowed_direction(name: str) -> None:
    path = MODEL / f"{name}.py"
    bad = []
    for mod, top, line in _imports(path):
        if mod == "earshot.model" and name != "__init__":
            bad.append(f"line {line}: imports the package's __init__ (import the submodule instead)")
        elif mod.startswith("earshot.model."):
            sub = mod.split(".")[2]
            allowed = TOP[name] | (set() if top else LAZY.get(name, set()))
            if sub not in allowed:
                bad.append(f"line {line}: imports {sub} {'at module level' if top else 'in a function'}")
        if top and name in TORCH_FREE and mod.split(".")[0] in ("torch", "onnx", "onnxruntime"):
            bad.append(f"line {line}: imports {mod} at module level")
    tree = ast.parse(path.read_text())
    if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body):
        bad.append("defines a module-level __getattr__")
    assert not bad, f"{path.name}: " + "; ".join(bad)


def test_no_import_cycle_through_the_model_package() -> None:
    """Module-level imports across all of earshot: no cycle passes through earshot.model."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        name = _module_name(path)
        graph[name] = {m for m, top, _ in _imports(path) if top and m.startswith("earshot")}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            n = todo.pop()
            for m in graph.get(n, ()):
                if m == goal:
                    return True
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return False

    model_modules = [n for n in graph if n == "earshot.model" or n.startswith("earshot.model.")]
    assert len(model_modules) == len(TOP)
    cycles = [n for n in model_modules if reaches(n, n)]
    assert not cycles, f"import cycle through {cycles}"


def test_the_daemon_uses_only_the_package_surface() -> None:
    """The analyzers and the service see a model only through earshot.model (ScoringModel, load_model)."""
    for name in ("analyzer", "service", "offline", "monitor", "metrics", "scores", "control", "integrations"):
        path = PKG / f"{name}.py"
        deep = [(m, line) for m, _, line in _imports(path) if m.startswith("earshot.model.")]
        assert not deep, f"{name}.py imports {deep}"


@pytest.mark.parametrize("name", sorted(TOP))
def test_each_module_imports_alone_in_a_fresh_interpreter(name: str) -> None:
    mod = "earshot.model" if name == "__init__" else f"earshot.model.{name}"
    code = f"import sys, {mod}; print('torch' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "daemon"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=90)
    assert out.returncode == 0, out.stderr
    if name in TORCH_FREE:
        assert out.stdout.strip() == "False", f"{mod} imports torch"


def test_the_old_modules_are_gone() -> None:
    for old in ("model.py", "checkpoint.py", "backend.py", "backend_onnx.py", "modelspec.py"):
        assert not (PKG / old).exists(), old
