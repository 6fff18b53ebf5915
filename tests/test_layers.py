"""Dependencies point down only (system.md, style.md): read from the source with ``ast``, nothing imported.

- no import cycle among the modules of ``ppcl/`` and ``ppcl_kfp/`` (one graph: a cycle through both is caught);
- no module imports another module's private name (``from x import _y``, or ``mod._y`` where ``mod`` is one of
  our modules bound by an import);
- the library ``ppcl/`` reaches nothing of the layers above it: no import of ``ppcl_kfp``, ``components`` or
  ``pipelines``, and no loading of Python files by path (that is how components/ and pipelines/ are loaded).

Edges of the graph: every ``import`` / ``from ... import`` anywhere in a file (module level, inside functions,
under ``if TYPE_CHECKING``: a type-only import still means the two modules know each other), relative ones
resolved; ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``; a string
constant that names one of our modules (an importlib registry such as ``ppcl.arch.FAMILIES``'
``"ppcl.arch.flux:FluxAdapter"``) is an edge too, so a cycle cannot hide behind a lazy import. Importing a
submodule also runs its package's ``__init__``; that implicit edge is not counted (else every package whose
``__init__`` re-exports a submodule would be a cycle).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ppcl", "ppcl_kfp")

# Private names still imported across modules while a refactor is under way; empty when none is. Each entry:
# (importing module, imported module, name). An entry that no longer occurs fails the test, so it cannot go stale.
PRIVATE_IMPORTS_PENDING: set[tuple[str, str, str]] = set()

# Private modules of other libraries that have no public home in the pinned versions, each with its reason.
THIRD_PARTY_PRIVATE = {
    # torch's documented way to intercept every op (the meta-device memory planner); no public path in 2.13
    ("ppcl.resources", "torch.utils._python_dispatch", "TorchDispatchMode"),
    # the flattening helper that goes with it (torch.utils.pytree does not exist in 2.13)
    ("ppcl.resources", "torch.utils._pytree", "tree_leaves"),
    # FSDP2 run on meta tensors over torch's fake process group (the planner counts the real sharding engine's
    # buffers): the fake store and the FSDP2 internals patched for a meta device have no public path in 2.13
    ("ppcl.resources", "torch.testing._internal.distributed.fake_pg", "FakeStore"),
    ("ppcl.resources", "torch.distributed.fsdp._fully_shard", "_fsdp_collectives"),
    ("ppcl.resources", "torch.distributed.fsdp._fully_shard", "_fsdp_param_group"),
    ("ppcl.resources", "torch.distributed.fsdp._fully_shard", "_fsdp_param"),
}


def _modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package ``__init__``) for every .py file under PACKAGES."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, (path, _) in MODULES.items()}


def _from_target(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """Every import statement of ``module``: (absolute module imported from, names imported, line)."""
    _, is_pkg = MODULES[module]
    out = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((_from_target(module, is_pkg, node), [a.name for a in node.names], node.lineno))
    return out


_MODULE_STRING = re.compile(r"^([A-Za-z_][\w.]*)(:[A-Za-z_]\w*)?$")


def edges(module: str) -> dict[str, int]:
    """Our modules that ``module`` depends on -> the first line that says so."""
    out: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target in MODULES and target != module:
            out.setdefault(target, line)

    for target, names, line in imports(module):
        if not names:
            add(target, line)
        for name in names:
            add(f"{target}.{name}" if f"{target}.{name}" in MODULES else target, line)
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _MODULE_STRING.match(node.value)
            if m:
                add(m.group(1), node.lineno)
    return out


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a closed path ``[a, b, ..., a]``) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred nodes, recursion depth is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in components:  # a shortest path back to the start, inside the component (BFS)
        members, start = set(comp), comp[0]
        parent: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parent:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in members and w not in parent:
                        parent[w] = v
                        nxt.append(w)
            frontier = nxt
        path, v = [start], parent[start]
        while v != start:
            path.append(v)
            v = parent[v]
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_graph_is_read():
    """The walker sees what it must: module- and function-level, relative and string edges of real modules."""
    graph = {m: edges(m) for m in MODULES}
    assert "ppcl.errors" in graph["ppcl.arch"]  # module level
    assert "ppcl.arch.flux" in graph["ppcl.arch"]  # FAMILIES' "ppcl.arch.flux:FluxAdapter"
    assert "ppcl.plots" in graph["ppcl.probe"]  # inside write_probe
    assert "ppcl.stages" in graph["ppcl.cli.probe"] or "ppcl.probe" in graph["ppcl.cli.probe"]  # inside run()
    assert "ppcl.config" in graph["ppcl_kfp.dag"]  # the DAG layer's package is walked too
    # `from ppcl.evaluate import clip` is an edge to the submodule, not to the package
    assert "ppcl.evaluate.clip" in graph["ppcl.evaluate.evaluation"]
    # relative imports, from a module and from a package __init__
    rel = ast.parse("from ..arch import common").body[0]
    assert _from_target("ppcl.evaluate.fid", False, rel) == "ppcl.arch"
    assert _from_target("ppcl.evaluate", True, ast.parse("from . import metrics").body[0]) == "ppcl.evaluate"


def test_find_cycles_reports_a_closed_path():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e": 5}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycle():
    graph = {m: edges(m) for m in MODULES}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (module (line of the import) -> ...):\n" + "\n".join(
        _describe(c, graph) for c in cycles
    )


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_attributes_of_our_modules() -> list[str]:
    """``mod._name`` where ``mod`` is a name bound to one of our modules by an import (``from ppcl import distill``,
    ``import ppcl.plots as plots``) in the same file."""
    out = []
    for module, (_, is_pkg) in MODULES.items():
        bound: dict[str, str] = {}
        for node in ast.walk(TREES[module]):
            if isinstance(node, ast.Import):
                bound.update({a.asname: a.name for a in node.names if a.asname and a.name in MODULES})
            elif isinstance(node, ast.ImportFrom):
                target = _from_target(module, is_pkg, node)
                bound.update({a.asname or a.name: f"{target}.{a.name}" for a in node.names
                              if f"{target}.{a.name}" in MODULES})  # fmt: skip
        for node in ast.walk(TREES[module]):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and _private(node.attr) and bound[node.value.id] != module):
                out.append(f"{module}:{node.lineno}: {bound[node.value.id]}.{node.attr}")
    return out


def test_no_private_name_imported_from_another_module():
    found = set()
    for module in MODULES:
        for target, names, line in imports(module):
            for name in names:
                if _private(name) or any(_private(p) for p in target.split(".")):
                    found.add((module, target, name, line))
    unexpected = sorted(f"{m}:{line}: from {t} import {n}" for m, t, n, line in found
                        if (m, t, n) not in PRIVATE_IMPORTS_PENDING | THIRD_PARTY_PRIVATE)  # fmt: skip
    unexpected += _private_attributes_of_our_modules()
    assert not unexpected, "private names imported across modules:\n" + "\n".join(unexpected)
    # the allow-list holds only what is still there: an entry fixed elsewhere must leave it
    stale = PRIVATE_IMPORTS_PENDING - {(m, t, n) for m, t, n, _ in found}
    assert not stale, f"fixed, remove from PRIVATE_IMPORTS_PENDING: {sorted(stale)}"


_UPPER_LAYERS = ("ppcl_kfp", "components", "pipelines")
_LOAD_BY_PATH = {"spec_from_file_location", "SourceFileLoader", "run_path", "exec_module", "load_source"}


def test_the_library_does_not_reach_up():
    """ppcl/ imports nothing of ppcl_kfp/, components/ or pipelines/, and loads no Python file by path.

    ``ppcl.cli.COMMANDS`` may name ``ppcl_kfp.cli.*`` modules as strings: the ``ppcl`` command is the one place
    where both layers meet, and it skips a command whose module is not installed (see its docstring).
    """
    bad = []
    for module in (m for m in MODULES if m.split(".")[0] == "ppcl"):
        for target, names, line in imports(module):
            if target.split(".")[0] in _UPPER_LAYERS:
                bad.append(f"{module}:{line}: imports {target}")
        for node in ast.walk(TREES[module]):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in _LOAD_BY_PATH:
                bad.append(f"{module}:{node.lineno}: loads Python by path ({name})")
            # a module path as a string (an importlib registry); bare "components" is also kustomize's key
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and module != "ppcl.cli"
                    and _MODULE_STRING.match(node.value) and node.value.split(".")[0] == "ppcl_kfp"):
                bad.append(f"{module}:{node.lineno}: names {node.value!r}")
    assert not bad, "the library reaches into the layers above it:\n" + "\n".join(bad)


@pytest.mark.parametrize("command", ["pipeline", "demo"])
def test_dag_commands_live_in_the_dag_layer(command):
    from ppcl.cli import COMMANDS

    assert COMMANDS[command] == f"ppcl_kfp.cli.{command}"
    assert COMMANDS[command] in MODULES


def test_a_command_whose_module_is_not_installed_is_left_out(tmp_path, monkeypatch):
    """ppcl without ppcl_kfp (the runtime image) still parses every other command; a missing dependency INSIDE
    an installed command module is still an error, not a silently missing command."""
    import sys

    from ppcl import cli

    (tmp_path / "ppcl_layers_probe_pkg").mkdir()
    (tmp_path / "ppcl_layers_probe_pkg" / "__init__.py").write_text("")
    (tmp_path / "ppcl_layers_probe_pkg" / "broken.py").write_text("import ppcl_layers_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMANDS", {"tiny": "ppcl.cli.tiny", "pipeline": "ppcl_layers_absent.cli.pipeline"})
    parser = cli.build_parser()
    assert parser.parse_args(["tiny", "--arch", "flux", "--out", "x"]).command == "tiny"
    with pytest.raises(SystemExit):  # not offered
        parser.parse_args(["pipeline", "compile"])
    monkeypatch.setattr(cli, "COMMANDS", {"broken": "ppcl_layers_probe_pkg.broken"})
    with pytest.raises(ModuleNotFoundError, match="ppcl_layers_no_such_dependency"):
        cli.build_parser()
    sys.modules.pop("ppcl_layers_probe_pkg", None)
