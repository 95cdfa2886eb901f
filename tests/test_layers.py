"""The package layers (.importlinter) hold, and no package has an import circle.

Both checks read the source (grimp's import graph: imports inside functions count too);
nothing is imported, so they need neither torch nor a database.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")  # installed with import-linter (the test extras)

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "models", "worker", "felis_client")


def test_the_import_contracts_hold():
    """lint-imports with the repository's .importlinter: exit 0, every contract kept."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
         ".importlinter", "--no-cache", "--no-logo"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"lint-imports failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def _strongly_connected(nodes: set[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, successors = work[-1]
            for w in successors:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    components.append(sorted(component))
    return components


def import_circles(graph, package: str) -> list[str]:
    """Every circle of imports between the modules of `package`, described with line numbers."""
    nodes = set(graph.find_descendants(package)) | {package}
    edges = {m: graph.find_modules_directly_imported_by(m) & nodes for m in nodes}
    circles = []
    for component in _strongly_connected(nodes, edges):
        if len(component) == 1 and component[0] not in edges[component[0]]:
            continue
        inside = set(component)
        lines = [f"{a} -> {b} (line {', '.join(str(d['line_number']) for d in graph.get_import_details(importer=a, imported=b))})"
                 for a in component for b in sorted(edges[a] & inside)]
        circles.append("circle between " + ", ".join(component) + ":\n    " + "\n    ".join(lines))
    return circles


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(*PACKAGES, include_external_packages=True, cache_dir=None)


@pytest.mark.parametrize("package", ["models", "service"])
def test_no_import_circles(graph, package):
    circles = import_circles(graph, package)
    assert not circles, "\n".join(circles)


def test_a_circle_is_seen(tmp_path, monkeypatch):
    """The circle check itself: two modules importing each other, one inside a function."""
    pkg = tmp_path / "felis_circle_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from felis_circle_probe import b\n")
    (pkg / "b.py").write_text("def f():\n    from felis_circle_probe.a import x\n")
    (pkg / "c.py").write_text("import felis_circle_probe.a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = grimp.build_graph("felis_circle_probe", cache_dir=None)
    (circle,) = import_circles(probe, "felis_circle_probe")
    assert "felis_circle_probe.a, felis_circle_probe.b" in circle and "line 2" in circle
