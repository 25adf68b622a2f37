"""engine/ is a UI-free library: importing it must not load textual or rich."""
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[1] / "engine"
MODULES = sorted(   # every module and package of engine/, sub-packages included
    ".".join(("engine",) + p.relative_to(ENGINE).with_suffix("").parts[:-1 if p.stem == "__init__" else None])
    for p in ENGINE.rglob("*.py") if p.stem != "__main__")


@pytest.mark.parametrize("module", MODULES)
def test_engine_module_does_not_import_ui(module):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich')); "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{module} loads UI modules: {r.stdout.strip()} {r.stderr[-500:]}"


def test_no_ui_import_statements_in_engine():
    offenders = []
    for p in ENGINE.rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            s = line.strip()
            if s.startswith(("import textual", "from textual", "import rich", "from rich")):
                offenders.append(f"{p.name}:{i}")
    assert offenders == []


def test_argument_wiring_lives_only_in_engine_cli():
    """Library modules expose plain functions; every subcommand's argparse wiring is in engine/cli."""
    import ast
    offenders = []
    for p in ENGINE.rglob("*.py"):
        if p.relative_to(ENGINE).parts[0] == "cli":
            continue
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            imported = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            wires = isinstance(node, ast.Attribute) and node.attr in ("add_argument", "add_parser")
            if wires or any(m.split(".")[0] == "argparse" for m in imported):
                offenders.append(f"{p.relative_to(ENGINE)}:{node.lineno}")
    assert offenders == []
