"""The package's shape, checked from its source with ``ast``: imports run one way, files have one owner.

- no import cycle among ``recast``'s modules (module-level imports; a package ``__init__`` counts;
  imports under ``if TYPE_CHECKING:`` are for type checkers only and do not count);
- no module outside ``recast.format`` names the tasks folder or the config file, or stages files;
- no class over 400 lines, no module over 500, and only a handful of imports inside functions,
  each with a comment saying why (deferring an optional heavy dependency).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "recast"
MAX_INNER_IMPORTS = 8
FORMAT_ONLY_NAMES = {"TASKS_DIR", "CONFIG_FILE", "write_staged", "promote", "read_checked", "staged_path", "lock_directory"}
FORMAT_ONLY_STRINGS = {"recast_config.json", "backbone.safetensors"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            body.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            body.extend(node.body + node.orelse + node.finalbody)
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The project modules an import statement needs: ``from a.b import c`` needs module ``a.b.c``
    when ``c`` is a submodule, else ``a.b`` itself (``c`` is defined by ``a/b/__init__``). Parent
    packages that a submodule import starts first are not edges: they cannot close a cycle."""
    if isinstance(node, ast.Import):
        candidates = {alias.name for alias in node.names}
    else:
        base = node.module or ""
        subs = {f"{base}.{alias.name}" for alias in node.names}
        candidates = {c for c in subs if c in MODULES} | ({base} if not subs <= set(MODULES) else set())
    return {c for c in candidates if c in MODULES and c != module}


GRAPH = {name: set().union(*(_targets(name, n) for n in _top_level_imports(tree)), set()) for name, tree in TREES.items()}


def _cycle() -> list[str] | None:
    """One import cycle, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_graph_sees_real_edges() -> None:
    assert "recast.format" in GRAPH["recast.protocol"] and "recast.protocol" in GRAPH["recast.model"]


def test_no_import_cycle() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("recast.format")))
def test_only_the_format_package_touches_model_directory_files(module: str) -> None:
    tree = TREES[module]
    names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    tasks_paths = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)
                   and isinstance(n.right, ast.Constant) and n.right.value == "tasks"]
    assert not names & FORMAT_ONLY_NAMES, f"{module} imports {names & FORMAT_ONLY_NAMES} (use recast.format.ModelStore)"
    assert not strings & FORMAT_ONLY_STRINGS, f"{module} names {strings & FORMAT_ONLY_STRINGS} (use recast.format)"
    assert not tasks_paths, f"{module} builds paths into tasks/ at lines {tasks_paths} (use recast.format.ModelStore)"


def test_sizes_of_modules_and_classes() -> None:
    long_modules = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 500}
    long_classes = {
        f"{m}.{c.name}": c.end_lineno - c.lineno + 1
        for m, tree in TREES.items() for c in ast.walk(tree)
        if isinstance(c, ast.ClassDef) and c.end_lineno - c.lineno + 1 > 400
    }
    assert not long_modules and not long_classes, (long_modules, long_classes)


def test_imports_inside_functions_are_few_and_explained() -> None:
    inner = []
    for module, tree in TREES.items():
        lines = MODULES[module].read_text().splitlines()
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        here, before = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                        inner.append((f"{module}:{node.lineno}", "#" in here or before.startswith("#")))
    assert len(inner) <= MAX_INNER_IMPORTS, f"{len(inner)} imports inside functions: {[m for m, _ in inner]}"
    assert all(explained for _, explained in inner), [m for m, ok in inner if not ok]


def test_the_command_line_starts_without_peft_or_the_web_stack() -> None:
    """``recast --help`` (and every command but the ones that need them) must not load PEFT,
    transformers, FastAPI or uvicorn: seconds of start-up, and absent on machines that only train."""
    code = ("import sys; from recast.cli import build_parser; build_parser(); "
            "print(','.join(m for m in ('peft', 'transformers', 'fastapi', 'uvicorn') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == ""
