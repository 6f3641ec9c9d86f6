"""The core's shape, read from the source with ``ast`` (imports inside functions counted): no
import cycle among dpr_lib's modules, no private name of a dpr_lib module imported by another
module or by bench, no dpr_lib function over 100 lines, no module over 700, and one writer of a
manifest's shard entries."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 700


def _modules(package: str) -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules("dpr_lib")


def _is_package(name: str) -> bool:
    return MODULES.get(name, pathlib.Path()).name == "__init__.py"


def _imports(name: str, path: pathlib.Path):
    """(target module, imported name or None, line) for every dpr_lib import in the file."""
    tree = ast.parse(path.read_text())
    base = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dpr_lib"):
                    yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{parent}.{node.module}" if node.module else parent
            else:
                mod = node.module or ""
            if not mod.startswith("dpr_lib"):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                yield (sub, None, node.lineno) if sub in MODULES else (mod, a.name, node.lineno)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in _imports(name, path):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_dpr_lib_modules():
    """A package importing its own submodules is not a cycle unless a submodule imports it back."""
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("package", ["dpr_lib", "bench", "jobs"])
def test_no_private_name_of_a_dpr_lib_module_is_imported_from_outside_it(package):
    found = []
    for name, path in _modules(package).items():
        for target, imported, line in _imports(name, path):
            if imported and imported.startswith("_") and not imported.startswith("__") and target != name:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {target}.{imported}")
    assert found == []


def test_no_dpr_lib_function_over_100_lines():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_no_dpr_lib_module_over_700_lines():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert long == []


def test_only_the_version_writer_makes_shard_entries():
    """``ShardEntry(...)`` is built in one place: the version writer (and the manifest's reader)."""
    makers = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "ShardEntry":
                makers.append(name)
    assert set(makers) <= {"dpr_lib.index.writer", "dpr_lib.manifest"}
    assert "dpr_lib.index.writer" in makers
