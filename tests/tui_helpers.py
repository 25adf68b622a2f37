"""Helpers shared by the Pilot tests of the TUI (test_tui.py, test_tui_recovery.py)."""
from __future__ import annotations

import asyncio
import time

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
