"""No file-level import cycles among the project's packages.

Every `import` and `from ... import` in a file counts, at any depth (an import inside a function
still makes the two files depend on each other; it only hides the cycle until that call). An import
is an edge to the file it names: `from a.b import c` to a/b/c.py when that is a module, else to
a/b.py or a/b/__init__.py. The implicit import of a parent package's __init__ is not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("rlhf", "actors", "rollout", "reward", "weight_sync")

# Cycles known and being removed in their own change; delete the entry with the cycle.
KNOWN: set[frozenset[str]] = set()


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages under root."""
    out = {}
    for package in packages:
        for f in sorted((root / package).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its file."""
    files = module_files(root, packages)
    graph: dict[str, set[str]] = {}
    for module, f in files.items():
        package = module if f.name == "__init__.py" else module.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:
                    if f"{base}.{a.name}" in files:
                        deps.add(f"{base}.{a.name}")
                    elif base in files:
                        deps.add(base)
        graph[module] = deps - {module}
    return graph


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The sets of modules that import each other, directly or through others (the graph's strongly
    connected components of more than one module)."""
    reaches = {v: reach(graph, v) for v in graph}
    return {frozenset({v} | {w for w in reaches[v] if v in reaches[w]}) for v in graph if v in reaches[v]}


def test_the_packages_have_no_import_cycles():
    found = cycles(import_graph(REPO, PACKAGES))
    assert found - KNOWN == set(), f"import cycles: {[sorted(c) for c in found - KNOWN]}"
    assert KNOWN <= found, f"no longer a cycle, remove it from KNOWN: {[sorted(c) for c in KNOWN - found]}"


def test_rewards_import_no_actor_rollout_or_sync_module():
    """The reward package sits below the actors: what both need (rlhf.devices) lives in rlhf."""
    graph = import_graph(REPO, PACKAGES)
    up = {(m, d) for m in graph if m.split(".")[0] == "reward" for d in reach(graph, m)
          if d.split(".")[0] in ("actors", "rollout", "weight_sync")}
    assert up == set()


def test_the_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "__init__.py").write_text("")
    (tmp_path / "p" / "a.py").write_text("from p.b import B\n")
    (tmp_path / "p" / "b.py").write_text("def f():\n    from p import c\n")
    (tmp_path / "p" / "c.py").write_text("import p.a\n")
    (tmp_path / "p" / "d.py").write_text("from . import a\nfrom p.a import x\n")  # imports into the cycle only
    graph = import_graph(tmp_path, ("p",))
    assert graph == {"p": set(), "p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert cycles(graph) == {frozenset({"p.a", "p.b", "p.c"})}
