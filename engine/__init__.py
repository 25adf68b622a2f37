"""qlora-tui's engine. Importing it disarms the Hub-kernel download path (engine.core.hub)."""
from engine.core import hub as _hub

_hub.install()
