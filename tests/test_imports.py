"""The package's import structure: no module of tgdp imports itself back through others (deferred,
function-level imports included: a cycle hidden in a function is still a cycle), and an import
alias means one thing everywhere."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "tgdp"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The tgdp modules a file imports anywhere. `from pkg import sub` counts as the submodule only,
    as Python runs it (the package's __init__ is already running or done)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tgdp"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            out |= subs
            if len(subs) < len(node.names):
                out.add(node.module)
    return out


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [node, dep] if dep in path else path + [node, dep]
            if dep not in state and (found := visit(dep, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_no_import_cycles_between_modules_or_subpackages():
    modules = _modules()
    graph = {name: _imports(ast.parse(path.read_text()), modules) - {name} for name, path in modules.items()}
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph) or [])
    subpackage = {name: ".".join(name.split(".")[:2]) for name in modules}
    packages: dict[str, set[str]] = defaultdict(set)
    for name, deps in graph.items():
        packages[subpackage[name]] |= {subpackage[d] for d in deps} - {subpackage[name]}
    assert _find_cycle(packages) is None, " -> ".join(_find_cycle(packages) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_an_alias_names_one_module_everywhere():
    aliases: dict[str, set[str]] = defaultdict(set)
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "tests").glob("*.py"), *(REPO / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                prefix = f"{node.module}." if isinstance(node, ast.ImportFrom) and node.module else ""
                for a in node.names:
                    if a.asname and len(a.asname) == 1:  # the one-letter aliases a reader must remember
                        aliases[a.asname].add(prefix + a.name)
    clashes = {alias: sorted(targets) for alias, targets in aliases.items() if len(targets) > 1}
    assert not clashes, clashes
