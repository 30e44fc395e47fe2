"""The relay as a workspace service: started with the stack, so relay-mode sites always report."""

from __future__ import annotations

import time
from typing import Sequence

from maelflow.services.base import ManagedService


class RelayService(ManagedService):
    name = "relay"
    start_timeout = 20.0

    def check_available(self) -> None:
        from maelflow.services.stack import discover

        discover(self.ws, "ecflow")  # raises with 'run maelflow services up' when it is down

    def port(self) -> int:  # the relay listens on nothing
        return 0

    def command(self, port: int) -> tuple[Sequence[str], dict[str, str]]:
        from maelflow.installation import maelflow_command

        return [*maelflow_command().split(), "relay", "run", "--workspace", str(self.ws.root)], \
            {"PYTHONUNBUFFERED": "1"}

    def healthy(self) -> bool:
        beat = self.ws.path("relay", "heartbeat")
        try:
            return time.time() - float(beat.read_text().strip()) < 30
        except (FileNotFoundError, ValueError):
            return False

    def url(self) -> str | None:
        return None
