"""`python -m engine ...`: the headless CLI (what detached runs execute)."""
import sys

from engine.cli import main

sys.exit(main())
