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


async def until(pilot, cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            await pilot.pause()
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, monkeypatch):
    """Each test its own settings file ($XDG_CONFIG_HOME) and working directory."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)


def plain(widget) -> str:
    return str(widget.render())
