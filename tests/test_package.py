"""The Python package's shape: no import cycle inside bnext/, the op contract (bnext/_ops/) below
everything else, files a newcomer can read, the public API where users find it."""
import ast
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import bnext

PACKAGE = Path(bnext.__file__).resolve().parent
MAX_LINES = 1000


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).parts)
    parts[-1] = parts[-1].split(".")[0]  # _C.cpython-311-x86_64-linux-gnu.so -> _C
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict:
    """Module name -> path, for every Python file and compiled extension of the package."""
    files = [p for p in PACKAGE.rglob("*") if p.suffix == ".py" or p.name.endswith(tuple(EXTENSION_SUFFIXES))]
    return {_module_name(p): p for p in sorted(files)}


def _imports(name: str, path: Path, modules: dict) -> set:
    """The bnext modules that `name` imports, at module level or inside a function (both count: a
    function-level import only defers the cycle to the first call).

    `from P import x` names module P.x when that is a module, else P itself (x is then defined in
    P). The import of a package that Python runs before any of its submodules is not counted: a
    package's __init__ importing its own submodules is how a package is assembled, not a cycle.
    """
    if path.suffix != ".py":
        return set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan), as sorted lists."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_read():
    graph = _graph()
    # Spot checks that the parser resolves every import form the package uses.
    assert "bnext.modules" in graph["bnext.sync"]  # from .modules import ...
    assert "bnext._ops.conventions" in graph["bnext._ops.fake"]  # from .conventions import ...
    assert "bnext._ops.fake" in graph["bnext._ops"]  # from . import autograd, fake, vmap
    assert "bnext._ops.handles" in graph["bnext.testing"]  # from ._ops.handles import ...


def test_no_import_cycle_inside_bnext():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _documented_order() -> dict:
    """Module -> rank in the map of bnext/__init__.py's docstring (top = 0); a package's modules
    share its rank."""
    lines = bnext.__doc__.split("Where things live")[1].splitlines()[1:]
    rank = {}
    for i, line in enumerate(l for l in lines if l.startswith("    ") and not l.startswith("     ")):
        for entry in line.strip().split("  ")[0].split(", "):
            rank["bnext." + entry.removesuffix(".py").removesuffix("/")] = i
    return rank


def test_each_module_imports_only_modules_below_it_in_the_package_map():
    rank, graph = _documented_order(), _graph()

    def entry(module):
        """The map's entry of `module`: itself, or the package it belongs to."""
        return next(m for m in (module, module.rpartition(".")[0]) if m in rank)

    for name, deps in graph.items():
        if name != "bnext":
            for dep in deps:
                # Inside one entry (bnext/_ops/) the cycle test is the rule.
                assert entry(dep) == entry(name) or rank[entry(dep)] > rank[entry(name)], (name, dep)


def test_the_op_contract_imports_nothing_above_it():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("bnext._ops"):
            assert all(d.startswith("bnext._ops") or d == "bnext._C" for d in deps), (name, deps)


REPO = PACKAGE.parent
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted(
    p for p in (REPO / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh")
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_file_over_1000_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(REPO)} has {n} lines; split it by responsibility"


def test_no_measurements_in_code_comments():
    # Code keeps a rule and its reason; the figures, the machines they were measured on and the
    # commands live in docs/performance.md (a machine's name in code is a measurement's trace).
    machines = ("EPYC", "Xeon", "Zen 2", "Zen 3", "Zen 4", "Ice Lake", "Sapphire Rapids", "Skylake")
    found = [f"{p.relative_to(REPO)}: {m}" for p in SOURCES for m in machines if m in p.read_text()]
    assert not found, found


def test_public_api():
    assert sorted(bnext.__all__) == sorted(
        ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
         "SyncBatchNorm", "batch_norm", "build_info", "convert_model", "decompositions", "revert_model",
         "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "SyncBatchNormAct", "batch_norm_act", "fuse_model",
         "FrozenBatchNorm2d", "freeze_batchnorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
         "GhostBatchNorm1d", "GhostBatchNorm2d", "MaskedBatchNorm1d", "SyncMaskedBatchNorm"]
    )
    for name in bnext.__all__:
        assert getattr(bnext, name) is not None
    from bnext.testing import emulate_cuda  # noqa: F401
