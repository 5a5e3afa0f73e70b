"""The package's layers (docs/DESIGN.md, "The layers"): the import-linter contract holds, and no import circle exists
anywhere in the package or the benchmarks."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), i.e. the import circles."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_linter_contract_holds():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "0 broken" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_no_import_circle_in_the_package():
    grimp = pytest.importorskip("grimp")  # installed with import-linter
    graph = grimp.build_graph("embedloss_kernels")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    # the package's __init__ re-exports its layers (the container, outside them); circles through it are not imports
    # between layers
    edges = {m: {t for t in ts if t != "embedloss_kernels"} for m, ts in edges.items() if m != "embedloss_kernels"}
    assert _cycles(edges) == []


def test_no_import_circle_in_the_benchmarks():
    scripts = {p.stem: p for p in (ROOT / "benchmarks").glob("*.py")}
    edges = {}
    for name, path in scripts.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in scripts and node.level == 0:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name in scripts}
        edges[name] = imported
    assert _cycles(edges) == []
    assert "common" in scripts and not edges["common"], "benchmarks/common.py imports no other benchmark"
