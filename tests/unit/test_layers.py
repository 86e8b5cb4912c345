"""The import graph of the project's packages: layered, each arrow pointing down, no cycles.

    ops                  the CLI, settings and wiring: may import everything below
    serving              the gateway (ingress, variants, review page)
    distill              distillation, quantization, the gate, the registry, the loop
    shadow               pairs: mirroring, scoring, storage, review queries
    serving.engines      the engines, their configs, structured outputs and tool calls
    core                 logging, metrics, client errors, config files: imports nothing above

Every import counts, at the top of a file or inside a function. An import of the project inside
a function is kept only to load a heavy library late, and says so in a comment."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests import REPO_ROOT

LAYERS = ("core", "serving.engines", "shadow", "distill", "serving", "ops")
PACKAGES = ("core", "serving", "shadow", "distill", "ops")


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific layer `module` belongs to."""
    best = max((name for name in LAYERS if module == name or module.startswith(name + ".")),
               key=len)
    return LAYERS.index(best)


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (a `from package import name` naming a module counts
    as that module)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n in known)
    found.discard(module)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {m: imports_of(p, m, known) for m, p in modules.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b} ({LAYERS[layer_of(a)]} must not import {LAYERS[layer_of(b)]})"
                  for a, targets in g.items() for b in targets if layer_of(b) > layer_of(a))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def late_imports_without_a_reason() -> list[str]:
    """`path:line` of each import of a project module inside a function with no comment on its
    line or the line above."""
    found = []
    for module, path in project_modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").split(".")[0] \
                        in PACKAGES and not any("#" in lines[i] for i in
                                                (inner.lineno - 1, inner.lineno - 2)):
                    found.append(f"{path.relative_to(REPO_ROOT)}:{inner.lineno}")
    return found


def test_an_import_inside_a_function_says_why():
    assert late_imports_without_a_reason() == []


def test_every_import_points_down_a_layer():
    assert upward(graph()) == []


def test_no_module_imports_itself_through_others():
    assert cycles(graph()) == []


@pytest.mark.parametrize("edges, problem", [
    ({"core.config": {"ops.cli"}}, "core.config -> ops.cli"),
    ({"serving.engines.fake": {"serving.app"}}, "serving.engines.fake -> serving.app"),
    ({"shadow.scoring": {"distill.gate"}}, "shadow.scoring -> distill.gate"),
])
def test_an_upward_arrow_is_caught(edges, problem):
    assert upward(edges)[0].startswith(problem)


def test_a_cycle_is_caught():
    g = {"shadow.a": {"shadow.b"}, "shadow.b": {"shadow.c"}, "shadow.c": {"shadow.a"},
         "shadow.d": {"shadow.a"}}
    assert cycles(g) == [["shadow.a", "shadow.b", "shadow.c"]]
    assert cycles({"shadow.a": {"shadow.b"}, "shadow.b": set()}) == []


# What starts a server or opens a socket belongs to tests/integration and tests/e2e.
SERVER_MODULES = ("socket", "socketserver", "http.server", "uvicorn", "ray.serve", "ray.train",
                  "psycopg",
                  "ops.gateway", "tests.oracle", "tests.promserver")


def server_imports(path: Path) -> list[str]:
    """The modules of SERVER_MODULES (or below them) that `path` imports."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.append(node.module or "")
    return sorted({n for n in names for s in SERVER_MODULES if n == s or n.startswith(s + ".")})


def test_unit_tests_start_no_servers():
    found = {str(p.relative_to(REPO_ROOT)): server_imports(p)
             for p in sorted((REPO_ROOT / "tests" / "unit").glob("*.py"))}
    assert {p: names for p, names in found.items() if names} == {}


def test_a_server_import_is_caught(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import json, ray\nfrom tests.oracle import serve_oracle\nimport ray.serve\n")
    assert server_imports(probe) == ["ray.serve", "tests.oracle"]


MAX_LINES = 400


def test_a_long_module_says_why():
    """A module over MAX_LINES lines says why in its docstring: "(Over 400 lines: ...)"."""
    long = {str(p.relative_to(REPO_ROOT)): n for p in project_modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES
            and f"(Over {MAX_LINES} lines:" not in (ast.get_docstring(ast.parse(p.read_text()))
                                                  or "")}
    assert long == {}
