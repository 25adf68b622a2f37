"""engine/ is a UI-free library: importing it must not load textual or rich."""
import subprocess
import sys
from pathlib import Path


ENGINE = Path(__file__).resolve().parents[2] / "engine"
MODULES = sorted(   # every module and package of engine/, sub-packages included
    ".".join(("engine",) + p.relative_to(ENGINE).with_suffix("").parts[:-1 if p.stem == "__init__" else None])
    for p in ENGINE.rglob("*.py") if p.stem != "__main__")


def test_no_engine_module_imports_ui():
    """Every module imported in turn in one fresh process (one Python start, not 61): the first
    whose import brings textual or rich in is named."""
    code = ("import sys, importlib\n"
            f"for m in {MODULES!r}:\n"
            "    importlib.import_module(m)\n"
            "    bad = sorted(x for x in sys.modules if x.split('.')[0] in ('textual', 'rich'))\n"
            "    if bad:\n"
            "        print(m, 'loads', ','.join(bad)); sys.exit(1)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout.strip()} {r.stderr[-800:]}"
    assert len(MODULES) > 50 and "engine.training.sft" in MODULES


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
