"""The house rules that keep protocols at the edges, checked on the source (imports read with ast).

- ``audit/`` stands alone: it imports nothing from ``dermgate/``.
- The core (the pipeline, queue, intake, store, database, records) imports no protocol package
  (``integration/``) and no protocol library (pydicom, pynetdicom, httpx), not even lazily.
- A protocol package takes its settings section from itself, never from ``dermgate.settings``,
  the wiring module that composes the sections.
- No import cycles between the project's modules, lazy imports inside functions and imports
  for the type checker (``if TYPE_CHECKING:``) included: a cycle hidden by either is still one.
  The other rules count run-time imports only.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dermgate", "audit", "inference", "integration", "models")
CORE = ("dermgate.pipeline", "dermgate.queue", "dermgate.intake", "dermgate.store", "dermgate.db",
        "dermgate.records", "dermgate.durable")
PROTOCOL_LIBRARIES = ("pydicom", "pynetdicom", "httpx", "integration")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if "migrations" not in p.parts}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@cache
def imports(module: str, typing: bool = False) -> frozenset[str]:
    """Every module ``module`` imports at run time (at the top or inside functions); with
    ``typing``, also those it imports for the type checker only."""
    path = modules()[module]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node) and not typing:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules() else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(ast.parse(path.read_text(encoding="utf-8")))
    return frozenset(found)


def project_imports(module: str) -> set[str]:
    return {m for m in imports(module, typing=True) if m in modules() and m != module}


def test_the_audit_package_imports_nothing_from_the_service() -> None:
    offending = {m: sorted(i for i in imports(m) if i.split(".")[0] == "dermgate")
                 for m in modules() if m.split(".")[0] == "audit"}
    assert not {m: i for m, i in offending.items() if i}


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_protocol_package_or_library(module: str) -> None:
    bad = sorted(i for i in imports(module) if i.split(".")[0] in PROTOCOL_LIBRARIES)
    assert not bad, f"{module} imports {bad}: inject a protocol edge instead (see dermgate/app.py)"


def test_the_core_does_not_import_the_settings_wiring() -> None:
    bad = {m for m in CORE if "dermgate.settings" in imports(m)}
    assert not bad, f"{sorted(bad)} import dermgate.settings, which composes the protocol packages' sections"


def test_the_fhir_package_owns_its_settings_section() -> None:
    bad = {m for m in modules() if m.startswith("integration.fhir") and "dermgate.settings" in imports(m)}
    assert not bad


def test_there_are_no_import_cycles() -> None:
    graph = {m: project_imports(m) for m in modules()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}   # 1: on the stack, 2: done
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2
    for module in sorted(graph):
        if module not in state:
            walk(module)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
