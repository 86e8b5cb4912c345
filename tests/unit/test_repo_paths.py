"""Everything the tests, the Makefile and CI read lies inside the repository: a user's clone has
nothing beside it, so a path that climbs out of the checkout works only on one machine.

Python files are read as syntax trees: every path built from `__file__` (`.parent`, `.parents[k]`,
`/ "..."`, through module-level names such as `REPO`) is resolved and must stay inside the
repository; a string literal that climbs with `../` is refused wherever it appears. The Makefile
and CI scripts must not name `../` at all.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "node_modules", "models", "build", "__pycache__", ".pytest_cache"}
PATH_CALLS = {"Path", "PurePath", "PosixPath"}
SAME_PATH_METHODS = {"resolve", "absolute", "expanduser"}
CLIMB = re.compile(r"(?<![.\w])\.\.[/\\]")  # ../ or ..\ as a path part (not the end of "...")


def _python_files() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")
                   and not (Path(folder) / d / "pyvenv.cfg").exists()]  # any virtualenv
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(set(found) - {Path(__file__).resolve()})  # this file quotes what it refuses


class _Paths(ast.NodeVisitor):
    """Resolves the path expressions of one module; collects those that leave `root`."""

    def __init__(self, file: Path, root: Path):
        self.file, self.root = file, root
        self.names: dict[str, Path] = {}
        self.escapes: list[tuple[int, str]] = []

    def path_of(self, node: ast.AST) -> Path | None:
        match node:
            case ast.Name(id="__file__"):
                return self.file
            case ast.Name(id=name):
                return self.names.get(name)
            case ast.Call(func=ast.Name(id=fn), args=[arg]) if fn in PATH_CALLS:
                return self.path_of(arg)
            case ast.Call(func=ast.Attribute(value=inner, attr=method)) if (
                    method in SAME_PATH_METHODS):
                return self.path_of(inner)
            case ast.Attribute(value=inner, attr="parent"):
                base = self.path_of(inner)
                return base.parent if base else None
            case ast.Subscript(value=ast.Attribute(value=inner, attr="parents"),
                               slice=ast.Constant(value=int(k))):
                base = self.path_of(inner)
                return base.parents[k] if base and k < len(base.parents) else None
            case ast.BinOp(left=left, op=ast.Div(), right=ast.Constant(value=str(part))):
                base = self.path_of(left)
                return Path(os.path.normpath(base / part)) if base else None
        return None

    def _check(self, node: ast.AST) -> None:
        path = self.path_of(node)
        if path is not None and not path.is_relative_to(self.root):
            self.escapes.append((node.lineno, f"{ast.unparse(node)} -> {path}"))

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        path = self.path_of(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name) and path is not None:
                self.names[target.id] = path

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._check(node)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        self._check(node)
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        self._check(node)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and CLIMB.search(node.value):
            self.escapes.append((node.lineno, f"{node.value[:80]!r} climbs with ../"))


def escapes(source: str, file: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, what) for each path in `source` (the text of `file`) that leaves `root`."""
    visitor = _Paths(file, root)
    visitor.visit(ast.parse(source))
    return visitor.escapes


def test_no_python_file_reads_a_path_outside_the_repository():
    found = {f"{f.relative_to(ROOT)}:{line}: {what}"
             for f in _python_files() for line, what in escapes(f.read_text(), f)}
    assert not found, "paths outside the repository:\n" + "\n".join(sorted(found))


@pytest.mark.parametrize("name", ["Makefile", ".ci/run", "pyproject.toml"])
def test_build_files_name_nothing_outside_the_repository(name):
    lines = [f"{name}:{n}: {line.strip()}"
             for n, line in enumerate((ROOT / name).read_text().splitlines(), 1)
             if CLIMB.search(line)]
    assert not lines, "\n".join(lines)


FILE = ROOT / "tests" / "unit" / "example.py"


@pytest.mark.parametrize("source", [
    'SPEC = Path(__file__).resolve().parents[2].parent / "beside" / "spec.yaml"',
    'REPO = Path(__file__).resolve().parents[2]\nSPEC = REPO.parent / "beside"',
    'REPO = Path(__file__).parent.parent.parent\nX = REPO / ".." / "beside"',
    'X = Path(__file__).parents[3]',
    'open("../beside/conformance/openai-chat-subset.yaml")',
])
def test_the_guard_catches_paths_that_climb_out(source):
    assert escapes(source, FILE)


@pytest.mark.parametrize("source", [
    'REPO = Path(__file__).resolve().parents[2]\nSPEC = REPO / "tests" / "data" / "x.yaml"',
    'HERE = Path(__file__).parent\nX = HERE.parent / "integration"',
    'X = Path(tmp).parent / "y"',  # not built from __file__: not a repository path
])
def test_the_guard_lets_paths_inside_the_repository_pass(source):
    assert escapes(source, FILE) == []


def test_files_the_tests_read_are_not_ignored_by_git():
    """A data file that .gitignore swallows exists here and is missing from every clone."""
    data = [str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "data").rglob("*") if p.is_file()]
    assert data, "tests/data is empty"
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *data], cwd=ROOT,
                             capture_output=True, text=True, check=False)
    assert ignored.returncode == 1, f"ignored by .gitignore: {ignored.stdout or ignored.stderr}"
