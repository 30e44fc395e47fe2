"""How this installation of maelflow is called: the command ecFlow and local jobs run."""

from __future__ import annotations

import sys
from pathlib import Path


def maelflow_command() -> str:
    """The console script beside this interpreter (the virtual environment's), else ``python -m``."""
    exe = Path(sys.executable).with_name("maelflow")
    return str(exe) if exe.exists() else f"{sys.executable} -m maelflow"
