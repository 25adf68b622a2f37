"""The config form at 80x24: find a field by name, help for the focused field only, and
ctrl+s that keeps the user's file (keys, order, comments) instead of a dump of every key."""
from __future__ import annotations

import pytest

from engine.core import config
from tui.app import QloraApp
from tui.testing import fixed_samplers
from tui_helpers import until
from tui_helpers import anyio_backend, isolated_settings  # noqa: F401 (fixtures)

USER_TOML = """\
# my first fine-tune: the demo, a bit slower
[model]
name = "builtin:tiny"   # the offline model

[data]
train = "builtin:sample"
max_length = 256

# rank: tried 8 first
[lora]
r = 16
alpha = 32

[train]
max_steps = 100        # enough for the demo
learning_rate = 2e-3
batch_size = 4
grad_accum = 1
"""


def test_edit_toml_changes_only_what_changed():
    cfg = config.from_dict(__import__("tomllib").loads(USER_TOML))
    assert config.edit_toml(USER_TOML, cfg) == USER_TOML          # nothing changed: same bytes
    cfg.lora.r = 8
    cfg.train.learning_rate = 1e-3
    cfg.train.seed = 7                                            # not in the file, not the default
    out = config.edit_toml(USER_TOML, cfg)
    old, new = USER_TOML.splitlines(), out.splitlines()
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    assert changed == [("r = 16", "r = 8"), ("learning_rate = 2e-3", "learning_rate = 0.001")]
    assert new[len(old):] == ["seed = 7"]                         # added to its own section
    assert config.from_dict(__import__("tomllib").loads(out)) == cfg


@pytest.mark.anyio
async def test_find_a_field_help_for_the_focused_one_and_save_keeps_the_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(USER_TOML)
    app = QloraApp(config.load(path), path, samplers=fixed_samplers(), readings_interval=0,
                   start_mode="config")
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: getattr(app.screen, "form_ready", False), what="the form")
        screen = app.screen
        assert not [r for r in screen.rows() if r.help.display and r.help.region.height]  # no help yet
        await pilot.press("/")
        await pilot.press(*"lora.r", "enter")
        await until(pilot, lambda: app.focused is not None and app.focused.id == "in-lora-r",
                    what="the jump to lora.r")
        await pilot.pause(0.2)
        shown = [f"{r.section}.{r.key}" for r in screen.rows() if r.help.region.height]
        assert shown == ["lora.r"]                                 # help for the focused field only
        assert "Rank" in str(screen.query_one("#row-lora-r").help.render())
        assert screen.query_one("#row-lora-r").region.y < 24        # scrolled into view
        app.focused.value = "8"
        await pilot.pause(0.3)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: "r = 8" in path.read_text(), what="the save")
        # the palette finds fields too
        titles = {c.title for c in app.get_system_commands(screen)}
        assert "Field train.learning_rate" in titles and "Field eval.max_new_tokens" in titles
    assert path.read_text() == USER_TOML.replace("r = 16", "r = 8")


def test_runs_of_a_config_are_listed_from_next_to_it(tmp_path, capsys, monkeypatch):
    """output.dir is relative to the config: `qlora-tui runs CONFIG` looks where the runs went
    (the README demo's runs are in examples/runs, not ./runs), and an empty folder says how."""
    from engine.cli import main
    from tui.testing import write_run
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "demo.toml").write_text(USER_TOML + '\n[output]\ndir = "runs"\n')
    write_run(proj / "runs", "20260101-120000-tiny")
    monkeypatch.chdir(tmp_path)
    assert main(["runs", str(proj / "demo.toml")]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and str(proj / "runs" / "20260101-120000-tiny") in out
    (tmp_path / "none").mkdir()
    assert main(["runs", "--dir", str(tmp_path / "none")]) == 0
    assert "qlora-tui runs examples/demo.toml" in capsys.readouterr().out


def test_the_demos_runs_folder_is_ignored_by_git():
    """The README demo writes examples/runs/ (output.dir of examples/demo.toml); git ignores it."""
    import shutil
    import subprocess
    from pathlib import Path
    from engine.core import config as config_mod
    repo = Path(__file__).resolve().parents[2]
    demo = config_mod.load(repo / "examples" / "demo.toml")
    runs = Path(demo.resolve_path(demo.output.dir)).resolve()
    assert runs == repo / "examples" / "runs"
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    probe = runs.relative_to(repo) / "20260101-120000-tiny" / "events.jsonl"
    assert subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=repo).returncode == 0
