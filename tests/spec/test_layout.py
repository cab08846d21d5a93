"""The package's shape: no import cycle among ktgen's modules (imports inside functions
included), no module past 1,000 lines, and nothing that cites a document the repository
does not hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ktgen"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The ktgen modules `name` imports, anywhere in it (module level or inside a function)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + (node.module.split(".") if node.module else []))
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def test_no_import_cycle():
    known = modules()
    graph = {n: imports_of(n, p, known) for n, p in known.items()}
    # a package imports its own modules to export them; every other edge must point down
    for pkg in [n for n, p in known.items() if p.name == "__init__.py"]:
        for child in [n for n in known if n.startswith(pkg + ".")]:
            graph[child].discard(pkg)
    cycles, state = [], {}

    def visit(n, stack):
        state[n] = "open"
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_over_a_thousand_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*") if p.is_file() and p.suffix in (".py", ".j2")
            for n in [len(p.read_text().splitlines())] if n > 1000}
    assert not long, long


CITATIONS = re.compile(r"CONTRACT|LESSONS|STYLE\.md|§|\b[Ii]ssue \d+|\bsection \d+")


def test_nothing_cites_a_document_outside_the_repository():
    files = [p for d in ("ktgen", "tests", "docs", "examples", "benchmarks") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.suffix in (".py", ".md", ".j2", ".yaml", ".sh")] + [ROOT / "README.md"]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:80]}" for p in files if p.name != "test_layout.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if CITATIONS.search(line)]
    assert not hits, "\n".join(hits)
