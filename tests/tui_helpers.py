"""Helpers shared by the Pilot tests of the TUI: import the fixtures by name into a test module
(`from tui_helpers import anyio_backend, isolated_settings`) to use them there."""
from __future__ import annotations

import asyncio
import time

import pytest

from engine.core import config
from tui.app import DEMO_OVERRIDES, QloraApp
from tui.testing import fixed_samplers


def demo_cfg(tmp_path, *extra):
    return config.load(None, DEMO_OVERRIDES + [f'output.dir="{tmp_path / "runs"}"', *extra])


def make_app(cfg, **kw) -> QloraApp:
    return QloraApp(cfg, None, samplers=fixed_samplers(), readings_interval=0, **kw)


async def until(pilot, cond, timeout: float = 60.0, what: str = "condition", detail=None) -> None:
    """Wait until ``cond()``; on a timeout fail, with ``detail()`` (the state worth seeing) said."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            await pilot.pause()
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f": {detail()}" if detail else ""))


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, monkeypatch):
    """Each test its own settings file ($XDG_CONFIG_HOME) and working directory."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)


def plain(widget) -> str:
    content = getattr(widget, "content", None)
    if hasattr(content, "layout"):            # tui.widgets.pairs.Pairs: its text before layout
        return content.plain
    return str(widget.render())


def screen_text(app) -> str:
    """What the terminal shows now (the current screen, dialogs over it included), as text."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def settled(pilot, app) -> str:
    """The screen's text once its layout covers the whole terminal (right after a screen switch
    the compositor may still hold a partial layout)."""
    await until(pilot, lambda: len(screen_text(app).splitlines()) == app.size.height, timeout=10,
                what="a full screen")
    return screen_text(app)


def footer_keys(app) -> list[str]:
    """What the current screen's footer should show: "key description" for each binding it
    shows; a group of bindings (Textual's ``Binding.Group``) as its keys, then its description."""
    out, groups = [], {}
    for active in app.active_bindings.values():
        b = active.binding
        if not (b.show and active.enabled and b.description):
            continue
        if b.group is not None:
            groups.setdefault(b.group.description, []).append(app.get_key_display(b))
        else:
            out.append(f"{app.get_key_display(b)} {b.description}")
    return out + [f"{''.join(keys)} {desc}" for desc, keys in groups.items()]
