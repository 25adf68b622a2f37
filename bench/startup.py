"""Time to first paint of the real qlora-tui app, and proof that torch/transformers wait.

    python bench/startup.py            # in-process (App.run_test, headless) + in tmux if present

In-process: the clock starts before `tui` is imported and stops when the first screen has
been refreshed (``call_after_refresh`` from ``on_mount``). tmux: from spawning `qlora-tui`
to the footer showing on the pane (what a user sees, terminal included). Prints figures;
exits 1 if torch or transformers were imported by first paint, or if first paint took > 1 s
in-process (the CI budget on 2 cores).
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import asyncio  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

BUDGET_S = 1.0


def in_process() -> tuple[float, list[str]]:
    os.environ.setdefault("XDG_CONFIG_HOME", tempfile.mkdtemp())
    from tui.app import QloraApp
    from tui.screens.train import TrainScreen

    painted: dict = {}

    class BenchApp(QloraApp):
        def on_mount(self) -> None:
            super().on_mount()

            def first_paint() -> None:
                if isinstance(self.screen, TrainScreen):
                    painted.setdefault("t", time.perf_counter())
                    painted.setdefault("heavy", [m for m in ("torch", "transformers", "trl", "peft")
                                                 if m in sys.modules])
                else:
                    self.call_after_refresh(first_paint)
            self.call_after_refresh(first_paint)

    async def run() -> None:
        app = BenchApp()
        async with app.run_test(size=(80, 24)) as pilot:
            while "t" not in painted:
                await pilot.pause(0.01)
    asyncio.run(run())
    return painted["t"] - T0, painted["heavy"]


def in_tmux() -> float | None:
    if shutil.which("tmux") is None:
        return None
    session = f"qlora-bench-{os.getpid()}"
    work = tempfile.mkdtemp()
    cmd = f"cd {work} && XDG_CONFIG_HOME={work} {sys.executable} -m tui"
    t0 = time.perf_counter()
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", cmd],
                   check=True)
    try:
        while time.perf_counter() - t0 < 30:
            pane = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True).stdout
            if "f4 Train" in pane and "Ready to train" in pane:
                return time.perf_counter() - t0
            time.sleep(0.01)
        return None
    finally:
        subprocess.run(["tmux", "send-keys", "-t", session, "C-q"], capture_output=True)
        time.sleep(0.3)
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def main() -> int:
    first, heavy = in_process()
    print(f"first paint (in-process, headless, incl. imports): {first * 1000:.0f} ms")
    print(f"heavy modules imported at first paint: {heavy or 'none'}")
    tm = in_tmux()
    if tm is not None:
        print(f"first paint in tmux (process start → Train screen on the pane): {tm * 1000:.0f} ms")
    ok = not heavy and first <= BUDGET_S
    print("OK" if ok else f"FAIL (budget {BUDGET_S:.1f} s, no torch/transformers)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
