"""The shape of the code: pipeline/'s import graph has no cycles (lazy imports inside functions
count), no two modules share a file name, and no subpackage imports another's private names.

Read with `ast` only: nothing here imports the modules, so it runs in a fraction of a second.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pipeline"


def _modules() -> Dict[str, Path]:
    """Every module under pipeline/, by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> List[Tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(name, path).split(".")
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import module` imports the module; `from module import name` the module
                found.append((sub, "", node.lineno) if sub in modules else (base, alias.name, node.lineno))
    return [(m, n, line) for m, n, line in found if m == PACKAGE or m.startswith(PACKAGE + ".")]


def _graph() -> Tuple[Dict[str, Set[str]], List[str]]:
    """The edges between pipeline's modules, and every private name imported across subpackages."""
    modules = _modules()
    edges: Dict[str, Set[str]] = defaultdict(set)
    private = []
    for name, path in modules.items():
        here = _package_of(name, path)
        for target, imported, line in _imports(name, path, modules):
            while target not in modules:  # `import pipeline.a.b` names a module; strip an attribute
                target = target.rpartition(".")[0]
            if target != name:
                edges[name].add(target)
            there = _package_of(target, modules[target])
            if imported.startswith("_") and not imported.startswith("__") and there != here:
                private.append(f"{path.relative_to(ROOT)}:{line} imports {target}.{imported}")
            # importing a module named with an underscore from another package is as private
            last = target.rpartition(".")[2]
            if not imported and last.startswith("_") and not last.startswith("__") and there != here:
                private.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return edges, private


def _cycle(edges: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of the graph, as the list of modules around it, or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    edges, _ = _graph()
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_two_modules_share_a_name():
    by_name = defaultdict(list)
    for path in _modules().values():
        if path.name != "__init__.py":
            by_name[path.name].append(str(path.relative_to(ROOT)))
    shared = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not shared, f"modules sharing a name: {shared}"


def test_no_private_names_across_subpackages():
    _, private = _graph()
    assert not private, "private names imported across subpackages:\n" + "\n".join(private)


def test_the_graph_sees_lazy_and_relative_imports():
    """The checker itself: a function-level relative import is an edge, resolved from its package."""
    edges, _ = _graph()
    modules = _modules()
    assert "pipeline.cli" in modules and edges["pipeline.cli"]
    assert all(t in modules for targets in edges.values() for t in targets)
    cycle = _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) == 4


def _classes() -> List[Tuple[str, ast.ClassDef]]:
    return [(name, node) for name, path in _modules().items()
            for node in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(node, ast.ClassDef)]


def test_one_refused_class_and_one_base_for_sample_errors():
    """Callers catch one type: `Refused` is defined once (errors.py); every per-sample error (a class
    that names its error row's `error_type`) derives from SampleError instead of duck typing."""
    classes = _classes()
    assert [name for name, c in classes if c.name == "Refused"] == ["pipeline.errors"]
    by_name = {c.name: c for _, c in classes}

    def derives(c: ast.ClassDef, base: str) -> bool:
        names = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in c.bases]
        return base in names or any(n in by_name and derives(by_name[n], base) for n in names)

    named = [c.name for _, c in classes if c.name != "SampleError" and any(
        isinstance(s, (ast.Assign, ast.AnnAssign)) and "error_type" in ast.unparse(s).split("=")[0]
        for s in c.body)]
    assert named, "the check found no per-sample error classes at all"
    assert [n for n in named if not derives(by_name[n], "SampleError")] == []


def _refusals_outside(classes: List[Tuple[str, ast.ClassDef]], home: str = "pipeline.errors") -> List[str]:
    """Every class deriving from Refused (its bases name Refused or a class that does, across modules)
    that is defined outside `home`, as "module.Class"."""
    bases = defaultdict(set)
    for _, c in classes:
        bases[c.name] |= {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in c.bases}
    refusals, grew = {"Refused"}, True
    while grew:
        more = {name for name, named in bases.items() if named & refusals} - refusals
        refusals |= more
        grew = bool(more)
    return [f"{module}.{c.name}" for module, c in classes
            if c.name in refusals and c.name != "Refused" and module != home]


def test_every_refusal_class_is_defined_in_errors():
    """errors.py is the one list of what a command can refuse: no Refused subclass elsewhere."""
    classes = _classes()
    assert len([c for module, c in classes if module == "pipeline.errors"]) > 10
    assert _refusals_outside(classes) == []


def test_the_refusal_check_finds_a_subclass_defined_elsewhere():
    """The checker itself: a refusal two steps down from Refused, in another module, is found."""
    tree = ast.parse("class Refused(Exception): pass\nclass TableError(Refused, ValueError): pass\n")
    planted = ast.parse("class MyIndexError(errors.TableError): pass\nclass Fine(ValueError): pass\n")
    classes = [("pipeline.errors", c) for c in tree.body] + [("pipeline.index.x", c) for c in planted.body]
    assert _refusals_outside(classes) == ["pipeline.index.x.MyIndexError"]


def test_the_command_line_catches_refusals_in_one_place():
    """cli.main is the one `except Refused as`: commands raise, they do not print and return 2."""
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ExceptHandler) and node.name and ast.unparse(node.type) in ("Refused",):
                found.append(name)
    assert "pipeline.cli" in found
    assert [n for n in found if n.endswith(("cli", "_commands"))] == ["pipeline.cli"]
