"""loraq's layering: a unit may import only units on lower layers (README, "Layout").

Every import in every module under loraq/ counts: top level and inside functions or classes,
absolute (`loraq.x`) and relative (`.x`, `..x`), and `importlib.import_module("loraq.x")`.
Within one unit (a package) imports are free, but the module graph must be acyclic, as must
the foundation modules among themselves."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "loraq"

# bottom -> top; keep README.md's "Layout" diagram in step with this table
LAYERS: dict[str, int] = {
    "loraq": 0,  # loraq/__init__.py
    "loraq.errors": 0,
    "loraq.atomic": 0,
    "loraq.cpus": 0,
    "loraq.ggml_types": 0,
    "loraq.gguf_io": 1,
    "loraq.kernels": 2,
    "loraq.quantize": 3,
    "loraq.convert": 3,
    "loraq.inspect": 3,
    "loraq.merge": 4,
    "loraq.llama": 5,
    "loraq.compare": 6,
    "loraq.imatrix": 6,
    "loraq.check": 6,
    "loraq.pipeline": 7,
    "loraq.cli": 8,
    "loraq.__main__": 9,  # `python -m loraq`: exists to import cli, so it sits above it
}
FOUNDATION = 0  # units on this layer may import each other (acyclically)

# Violations the current code has, to be fixed in loraq/ (each line as check_layers reports it).
# The test fails when one of them disappears, so this list cannot go stale.
KNOWN: set[str] = set()


def unit_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def source_modules(pkg: Path = PKG) -> dict[str, tuple[bool, str]]:
    """{dotted module name: (is a package __init__, source)} for every .py file under pkg."""
    out = {}
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        out[".".join(parts)] = (is_pkg, path.read_text(encoding="utf-8"))
    return out


def imports_of(module: str, is_pkg: bool, source: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported loraq module, line, only under `if TYPE_CHECKING:`) for every import in `source`.

    `from P import name` counts as an import of P.name when that is a module in `known`, else of P."""
    package = module if is_pkg else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.body:
                    visit(ast.Module(body=[sub], type_ignores=[]), True)
                for sub in child.orelse:
                    visit(ast.Module(body=[sub], type_ignores=[]), typing_only)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, typing_only) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    found.append((sub if sub in known else target, child.lineno, typing_only))
            elif (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr == "import_module"
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
            ):
                found.append((child.args[0].value, child.lineno, typing_only))
            visit(child, typing_only)

    visit(ast.parse(source), False)
    return [(m, line, tc) for m, line, tc in found if m == "loraq" or m.startswith("loraq.")]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _cycles(graph: Mapping[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(members, one cycle) of each strongly connected component with a cycle (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[tuple[list[str], list[str]]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
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
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append((sorted(comp), _one_cycle(graph, set(comp))))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _one_cycle(graph: Mapping[str, set[str]], comp: set[str]) -> list[str]:
    start = min(comp)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in comp)
        back = [w for w in nxt if w == start]
        if back:
            return path + [start]
        w = next((w for w in nxt if w not in seen), None)
        if w is None:  # dead end within the component: fall back to naming its members
            return sorted(comp) + [min(comp)]
        path.append(w)
        seen.add(w)


def check_layers(modules: Mapping[str, tuple[bool, str]], layers: Mapping[str, int] = LAYERS) -> list[str]:
    """Every layering problem in `modules` ({name: (is_pkg, source)}), one line each."""
    problems: list[str] = []
    known = set(modules)
    for unit in sorted({unit_of(m) for m in modules} - set(layers)):
        problems.append(f"{unit} is not in the layer table: add it to the layer table (tests/test_layers.py LAYERS) and README's Layout")
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, (is_pkg, src) in sorted(modules.items()):
        u = unit_of(mod)
        for target, line, typing_only in imports_of(mod, is_pkg, src, known):
            v = unit_of(target)
            what = f"{mod}:{line} imports {target}" + (" (under TYPE_CHECKING)" if typing_only else "")
            if target in known and target != mod:
                graph[mod].add(target)
            if u == v or u not in layers:
                continue
            if v not in layers:
                problems.append(f"{what}: {v} is not in the layer table")
            elif layers[v] > layers[u]:
                problems.append(f"{what}: layer {layers[v]} ({v}) is above layer {layers[u]} ({u})")
            elif layers[v] == layers[u] and layers[u] != FOUNDATION:
                problems.append(f"{what}: {v} is on the same layer {layers[u]} as {u}")
    for members, cyc in _cycles(graph):
        problems.append(f"import cycle among {', '.join(members)}: " + " -> ".join(cyc))
    return problems


# ---------------------------------------------------------------------------------------------


def test_loraq_respects_its_layers():
    problems = set(check_layers(source_modules()))
    new = sorted(problems - KNOWN)
    fixed = sorted(KNOWN - problems)
    assert not new, "layering violations (README.md, Layout):\n  " + "\n  ".join(new)
    assert not fixed, "fixed, remove from KNOWN in tests/test_layers.py:\n  " + "\n  ".join(fixed)


def test_layer_table_names_existing_units():
    units = {unit_of(m) for m in source_modules()}
    assert set(LAYERS) <= units, f"LAYERS names units that no longer exist: {sorted(set(LAYERS) - units)}"


def test_readme_layout_lists_every_unit():
    layout = (ROOT / "README.md").read_text(encoding="utf-8").rpartition("Layout")[2]
    missing = [u for u in LAYERS if u != "loraq" and u.removeprefix("loraq.") not in layout]
    assert not missing, f"README.md's Layout diagram lacks {missing}"


def _m(src: str, is_pkg: bool = False) -> tuple[bool, str]:
    return (is_pkg, src)


@pytest.mark.parametrize(
    "modules, expect",
    [
        # upward, absolute, at module level
        (
            {"loraq.gguf_io.reader": _m("from loraq.merge import merge_model\n"), "loraq.merge": _m("", True)},
            "layer 4 (loraq.merge) is above layer 1",
        ),
        # upward, relative, inside a function
        (
            {"loraq.kernels.fp": _m("def f():\n    from ..pipeline import runner\n"), "loraq.pipeline.runner": _m("")},
            "imports loraq.pipeline.runner: layer 7",
        ),
        # upward, inside a class body, plain `import`
        ({"loraq.errors": _m("class E:\n    import loraq.cli\n"), "loraq.cli": _m("")}, "layer 8 (loraq.cli) is above layer 0"),
        # upward, for type annotations only: still a dependency on a higher layer
        (
            {"loraq.errors": _m("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .compare.gates import G\n")},
            "loraq.errors:3 imports loraq.compare.gates (under TYPE_CHECKING): layer 6",
        ),
        # upward through importlib
        ({"loraq.atomic": _m("import importlib\nimportlib.import_module('loraq.llama.engine')\n")}, "layer 5 (loraq.llama)"),
        # sideways on layer 3
        ({"loraq.convert.peft": _m("from ..quantize import rules\n"), "loraq.quantize.rules": _m("")}, "on the same layer 3"),
        # a unit nobody placed
        ({"loraq.newthing": _m("")}, "add it to the layer table"),
        # cycle inside one package, and through a package __init__
        (
            {"loraq.merge.a": _m("from . import b\n"), "loraq.merge.b": _m("def f():\n    from .a import x\n")},
            "import cycle among loraq.merge.a, loraq.merge.b: loraq.merge.a -> loraq.merge.b -> loraq.merge.a",
        ),
        (
            {"loraq.kernels": _m("from . import fp\n", True), "loraq.kernels.fp": _m("from . import register\n")},
            "import cycle among loraq.kernels, loraq.kernels.fp: loraq.kernels -> loraq.kernels.fp",
        ),
        # a foundation cycle
        (
            {"loraq.errors": _m("from .atomic import x\n"), "loraq.atomic": _m("from .errors import y\n")},
            "loraq.atomic -> loraq.errors -> loraq.atomic",
        ),
    ],
)
def test_checker_reports_synthetic_violations(modules, expect):
    problems = check_layers(modules)
    assert any(expect in p for p in problems), problems


def test_checker_accepts_downward_and_same_package_imports():
    modules = {
        "loraq": _m("from .errors import LoraqError\n", True),
        "loraq.errors": _m(""),
        "loraq.atomic": _m("from .errors import LoraqError\nfrom . import ggml_types\n"),
        "loraq.ggml_types": _m("from .errors import BadArguments\n"),
        "loraq.merge": _m("from .merge import merge_model\n", True),
        "loraq.merge.merge": _m("from ..convert import convert_adapter\nfrom .. import __version__\nfrom .lora_file import x\n"),
        "loraq.merge.lora_file": _m("def f():\n    import loraq.gguf_io.reader\n"),
        "loraq.convert": _m("", True),
        "loraq.gguf_io.reader": _m(""),
    }
    assert check_layers(modules) == []
