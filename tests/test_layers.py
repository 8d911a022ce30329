"""Layers import one way (issue 12): no import cycle among ``src/ralm`` modules, and no import from a lower
layer to a higher one. Every import counts, at any depth (inside functions too) and relative ones as well.

Before the move (df36c16) this failed both ways: ``data/corpus`` and ``data/squad`` imported each other, and
``lm/`` (in_context, knnlm, retro_*) and ``datastore/knn_store`` imported ``eval/lm``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# low to high: a module may import only from its own layer or lower ones (the longest matching prefix decides)
LAYERS: dict[str, int] = {
    "ralm.errors": 0, "ralm.utils": 0,
    "ralm.data": 1, "ralm.data.tasks": 1,  # corpus readers, named data sets; task readers (issue 13)
    "ralm.core": 2,  # targets, windows, start token, neighbour logs: no model code
    "ralm.lm": 3,  # loading an LM, its tokenizer, its final states
    "ralm.datastore": 4,  # chunking, encoders, indexes, stores, build steps; the kNN-LM store reader
    "ralm.serve": 4,  # the retrieval service over stores, and the client that opens a served store as one
    "ralm.methods": 5,  # scorers on a loaded LM, and what builds their stores
    "ralm.eval": 6, "ralm.tuning": 6, "ralm.generate": 6,
    "ralm.cli": 7, "ralm.cli_retro": 7, "ralm.cli_options": 7, "ralm": 7,  # "ralm": the package __init__
}
# same layer, but independent of each other
APART = {("ralm.eval", "ralm.tuning"), ("ralm.tuning", "ralm.eval")}


def modules(src: Path) -> dict[str, Path]:
    out = {}
    for f in sorted((src / "ralm").rglob("*.py")):
        parts = list(f.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imported_names(mod: str, path: Path) -> set[str]:
    """Every dotted name ``mod`` imports, anywhere in the file; relative imports resolved."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            out.update(f"{prefix}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def graph(src: Path) -> dict[str, set[str]]:
    """module -> the ralm modules it imports (the longest known module each imported name starts with)."""
    mods = modules(src)
    g: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps = set()
        for name in imported_names(mod, path):
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                cand = ".".join(parts[:i])
                if cand in mods:
                    if cand != mod:
                        deps.add(cand)
                    break
        if path.name == "__init__.py":  # a package handing on its own modules' names does not depend on them
            deps = {d for d in deps if not d.startswith(mod + ".")}
        g[mod] = deps
    return g


def layer_of(mod: str) -> tuple[str, int]:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if mod == prefix or mod.startswith(prefix + "."):
            return prefix, LAYERS[prefix]
    raise KeyError(mod)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(g.items()):
        (mp, ml) = layer_of(mod)
        for dep in sorted(deps):
            (dp, dl) = layer_of(dep)
            if dl > ml or (mp, dp) in APART:
                bad.append(f"{mod} (layer {ml}) imports {dep} (layer {dl})")
    return bad


def test_every_module_has_a_layer():
    unplaced = []
    for mod in modules(SRC):
        try:
            layer_of(mod)
        except KeyError:
            unplaced.append(mod)
    assert not unplaced, f"add these modules to LAYERS: {unplaced}"


def test_no_import_cycle():
    """Issue 12: no two modules import each other, directly or around a loop (df36c16: data.corpus <-> data.squad)."""
    assert cycles(graph(SRC)) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    """Issue 12: data -> core -> lm -> datastore -> methods -> eval/tuning/generate -> cli, never back
    (df36c16: lm.in_context, lm.knnlm, lm.retro_* and datastore.knn_store imported eval.lm)."""
    assert upward_imports(graph(SRC)) == []


def test_the_checks_see_imports_inside_functions_and_relative_ones(tmp_path):
    """The checks themselves: a function-level import, a relative one and a `from pkg import module` all count."""
    pkg = tmp_path / "ralm"
    (pkg / "data").mkdir(parents=True)
    (pkg / "eval").mkdir()
    for f in ("__init__.py", "data/__init__.py", "eval/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from ..eval import b\n")
    (pkg / "data" / "c.py").write_text("from . import a\n")
    (pkg / "eval" / "b.py").write_text("from ralm.data import c\n")
    g = graph(tmp_path)
    # importing from a package runs its __init__ too: an edge to the package as well
    assert g["ralm.data.a"] == {"ralm.eval", "ralm.eval.b"} and g["ralm.data.c"] == {"ralm.data", "ralm.data.a"}
    assert cycles(g) == [["ralm.data.a", "ralm.data.c", "ralm.eval.b"]]
    assert upward_imports(g) == ["ralm.data.a (layer 1) imports ralm.eval (layer 6)",
                                 "ralm.data.a (layer 1) imports ralm.eval.b (layer 6)"]
