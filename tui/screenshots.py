"""Write docs/screens/*.svg: one screenshot per screen, from fixed inputs (reproducible).

    python -m tui.screenshots [OUT_DIR]      # default: docs/screens
"""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

SIZE = (100, 32)
HINT = {"rule": "eval_divergence", "severity": "warning", "step": 40,
        "symptom": "Eval loss rises while train loss falls",
        "cause": "Overfitting on a small dataset",
        "fix": "Add lora.dropout = 0.05 or train fewer epochs"}


async def _until(cond, timeout=120.0):
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("screenshot state not reached")


async def shoot(out: Path) -> list[Path]:
    from engine import service
    from tui.app import QloraApp
    from tui.testing import fixed_samplers, write_run

    work = Path(tempfile.mkdtemp())
    os.chdir(work)
    os.environ["XDG_CONFIG_HOME"] = str(work / "xdg")
    run = write_run(work / "runs", hints=[HINT])
    write_run(work / "runs", "20260102-090000-tiny", stop_at=23)
    cfg = service.demo_config()
    written = []

    def save(app, name):
        path = out / f"{name}.svg"
        path.write_text(app.export_screenshot(title=f"qlora-tui — {name}"), encoding="utf-8")
        written.append(path)

    app = QloraApp(cfg, None, attach=run, samplers=fixed_samplers(1), readings_interval=0)
    async with app.run_test(size=SIZE) as pilot:
        await _until(lambda: app.run_state.follower_ended)
        await pilot.pause()
        save(app, "train")
        await pilot.press("f3")
        await _until(lambda: getattr(app.screen, "form_ready", False))
        await _until(lambda: "trainable" in str(app.screen.query_one("#derived").render()))
        await pilot.pause()
        save(app, "config")
        await pilot.press("f2")
        await _until(lambda: app.screen.report is not None and app.screen.report.done)
        await pilot.press("n")
        await _until(lambda: "tokens" in str(app.screen.query_one("#row-header").render()))
        await pilot.pause()
        save(app, "dataset")
        await pilot.press("f5")
        await _until(lambda: app.screen.query_one("#runs").row_count == 2)
        await pilot.pause()
        save(app, "runs")
        await pilot.press("enter")
        await _until(lambda: getattr(app.screen, "info", None) is not None)
        await pilot.pause()
        save(app, "run-detail")
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "docs/screens").resolve()
    out.mkdir(parents=True, exist_ok=True)
    for p in asyncio.run(shoot(out)):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
