"""The package's structure: no import cycle among cm's modules, no module over 400 lines, every
checkpoint format spelled in cm/checkpoint.py alone, and no test module importing another.

The import graph. Every module of cm/ is a node, named as Python names it (cm/probe/__init__.py is
`cm.probe`, cm/probe/io.py is `cm.probe.io`). Every import of a cm module is an edge, wherever it
stands: at module level or inside a function (a lazy import runs the module all the same, and a
cycle through it turns into an import error as soon as someone hoists it), with relative imports
(`from . import x`, `from .unet import UNet`) resolved against the importing module's package, and
`importlib.import_module("cm....")` of a literal name counted too. Imports under
`if TYPE_CHECKING:` are left out: they never run.

`cm.x` against `cm.x.y`: an edge goes to the most specific module the import names. `import cm.x.y`
and `from cm.x.y import name` are edges to `cm.x.y`; `from cm.x import y` is an edge to `cm.x.y`
when y is a submodule, else to `cm.x` (the name is the package __init__'s). A package's __init__
importing its submodules gives it edges to them. Python also runs cm/x/__init__.py before it runs
cm/x/y.py, but that is not an edge of whoever imports cm.x.y: by then the package is in sys.modules,
and a submodule that takes no name from its package cannot see it half-initialised, so
`cm.x` -> `cm.x.y` -> `cm.x.z` is no cycle. A submodule that does take a name from its package whose
__init__ imports it (`cm.x` -> `cm.x.y` -> `cm.x`) is one, and a real one: which name exists depends
on which module is imported first.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

MAX_LINES = 400
# Checkpoint formats (cm/checkpoint.py's TRAINING, MODEL, MERGED, FROM_SCRATCH), up to the version.
FORMAT_PREFIXES = ("cm.train/", "cm.model/", "cm.merged/", "cm.from_scratch/")


def module_files(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of every .py file of the package folder root/package."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """The names of the modules one file imports, relative ones resolved, TYPE_CHECKING blocks skipped."""

    def __init__(self, module: str, is_package: bool, known: set[str]):
        self.package = module if is_package else module.rpartition(".")[0]
        self.known, self.found = known, set()

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.visit(node.test)
            for child in node.body:
                self.visit(child)
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base = ".".join(parts[:len(parts) - (node.level - 1)])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            self.found.add(submodule if submodule in self.known else source)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr == "import_module" and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            self.found.add(node.args[0].value)
        self.generic_visit(node)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """{module: the package's modules it imports} (see the module docstring for what counts)."""
    files = module_files(root, package)
    known = set(files)
    graph = {}
    for module, path in files.items():
        visitor = _Imports(module, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        # An import of a module the package does not have (cm.x.name: a name, not a file) is the
        # nearest module above it.
        edges = set()
        for name in visitor.found:
            while name and name not in known and "." in name:
                name = name.rpartition(".")[0]
            if name in known and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle, as [a, b, ..., a], per strongly connected group of more than one module (Tarjan)."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A path from the group's first module back to itself, inside the group (breadth first: shortest)."""
    start = min(group)
    paths = {nxt: [start, nxt] for nxt in sorted(graph[start] & group)}
    frontier = list(paths)
    while start not in paths:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    return paths[start]


# ----------------------------------------------------------------------------------------------
# The checks on hand-made graphs and packages: the cycle test must be able to fail.


def test_a_cycle_is_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    two = cycles({"a": {"b"}, "b": {"a"}, "x": {"y"}, "y": {"z"}, "z": {"x"}})
    assert sorted(two) == [["a", "b", "a"], ["x", "y", "z", "x"]]


def test_lazy_relative_and_package_imports_are_edges_and_type_checking_ones_are_not(tmp_path):
    files = {
        "pkg/__init__.py": "from pkg.sub import thing\n",
        "pkg/sub/__init__.py": "from .inner import thing\n",
        "pkg/sub/inner.py": "def thing():\n    from .. import other\n    return other\n",
        "pkg/other.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.late\n"
                        "else:\n    import json\n",
        "pkg/late.py": "import importlib\nimportlib.import_module('pkg.other')\nfrom pkg import helper\n",
        "pkg/helper.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.sub"}, "pkg.sub": {"pkg.sub.inner"}, "pkg.sub.inner": {"pkg.other"},
                     "pkg.other": set(), "pkg.late": {"pkg.other", "pkg.helper"}, "pkg.helper": set()}
    assert cycles(graph) == []
    (tmp_path / "pkg/other.py").write_text("from pkg.sub import thing\n")  # a lazy import closes a loop
    assert cycles(import_graph(tmp_path, "pkg")) == [["pkg.other", "pkg.sub", "pkg.sub.inner", "pkg.other"]]


# ----------------------------------------------------------------------------------------------
# The package


def test_no_import_cycle_among_cm_modules():
    graph = import_graph(ROOT, "cm")
    assert {"cm.cli", "cm.checkpoint", "cm.probe", "cm.probe.io", "cm.train"} <= set(graph)
    assert "cm.checkpoint" in graph["cm.train"] and "cm.probe.pruning" in graph["cm.probe"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)


def test_no_module_of_cm_is_over_400_lines():
    long = {str(path.relative_to(ROOT)): n for path in sorted((ROOT / "cm").rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines (split by concern): {long}"


def test_checkpoint_formats_are_spelled_in_cm_checkpoint_only():
    from cm import checkpoint

    for fmt in (checkpoint.TRAINING, checkpoint.MODEL, checkpoint.MERGED, checkpoint.FROM_SCRATCH):
        assert fmt.startswith(FORMAT_PREFIXES), fmt
    pattern = re.compile("|".join(re.escape(prefix) for prefix in FORMAT_PREFIXES))
    elsewhere = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "cm").rglob("*.py"))
                 if path != ROOT / "cm/checkpoint.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not elsewhere, f"checkpoint format strings outside cm/checkpoint.py: {elsewhere}"


@pytest.mark.parametrize("path", sorted((ROOT / "tests").glob("test_*.py")), ids=lambda p: p.name)
def test_no_test_module_imports_another(path):
    """Shared helpers live in tests/helpers.py and tests/conftest.py."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    tests = sorted(name for name in imported if re.fullmatch(r"tests\.test_\w+", name))
    assert not tests, f"{path.name} imports {tests}"
