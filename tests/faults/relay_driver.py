"""A relay process for the fault tests: maelflow's own relay loop (relay_forever: replay, back-off,
resending after a server restart) on one hand-made suite's spool, instead of the spools it would
find through deployed experiment configs.

    python -m tests.faults.relay_driver WORKSPACE SUITE SPOOL_DIR
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from maelflow.relay import LocalSpool, Sender
from maelflow.relay_loop import Target, relay_forever
from maelflow.services.stack import discover
from maelflow.workspace import Workspace


def main(root: str, suite: str, spool: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ws = Workspace(Path(root))

    def find(ws: Workspace) -> list[Target]:
        info = discover(ws, "ecflow")
        sender = Sender(info.extra["host"], info.extra["port"], passwd_file=info.extra.get("passwd_file"),
                        server_id=info.pid)
        return [Target(suite, "local", spool, LocalSpool(), sender)]

    relay_forever(ws, interval=0.5, find_targets=find)


if __name__ == "__main__":
    main(*sys.argv[1:4])
