"""The house's shape, held against the code: the import graph runs one way (launch and run never
reach into analyze, no cycles), analysis runs without torch, and every module the README, the
docs and tests/README.md name exists (no drifting layout list)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "suite"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every suite module a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules and name.startswith("suite")}


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ("launch", "run", "analyze") else "base"


def test_launch_and_run_never_import_analysis():
    arrows = [
        (module, target)
        for module, targets in GRAPH.items()
        for target in targets
        if stage(module) in ("launch", "run") and stage(target) == "analyze"
    ]
    assert arrows == []


# The command shims (``python -m suite.X``): each only imports its stage's main.
COMMANDS = (
    "suite.__main__",
    "suite.collect",
    "suite.report",
    "suite.remedy",
    "suite.frontier",
    "suite.compare",
    "suite.leaderboard",
    "suite.reference",
)


def test_the_base_imports_no_stage():
    """The modules every stage shares (schema, record, store, plan, verdict, ...) sit below."""
    arrows = [
        (module, target)
        for module, targets in GRAPH.items()
        for target in targets
        if stage(module) == "base" and stage(target) != "base" and module not in COMMANDS
    ]
    assert arrows == []


def test_the_import_graph_has_no_cycles():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in GRAPH.get(module, ()):
            if target == module or state.get(target) == "done":
                continue
            assert state.get(target) != "open", " -> ".join([*path, module, target])
            visit(target, [*path, module])
        state[module] = "done"

    for module in GRAPH:
        if module not in state:
            visit(module, [])


ANALYSIS = sorted(
    [m for m in GRAPH if stage(m) == "analyze"]
    + ["suite.config", "suite.record", "suite.store", "suite.plan", "suite.verdict",
       "suite.provenance", "suite.collect", "suite.report"]
)  # fmt: skip


def test_analysis_imports_no_torch():
    """collect, summaries, figures and the report run where only the store is: a machine
    without torch (the store copied to a laptop)."""
    script = (
        "import sys, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {ANALYSIS!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "tests/README.md"]
NAMED = re.compile(
    r"(?<![\w./-])((?:suite|variants|tests|benchmarks|docs|conf|scripts|examples)/[\w/.-]*\w)"
)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_path_a_document_names_exists(document):
    missing = sorted(
        {
            path
            for path in NAMED.findall(document.read_text())
            if not (REPO / path).exists() and "*" not in path and "..." not in path
        }
    )
    assert missing == [], f"{document.name} names paths that do not exist"
