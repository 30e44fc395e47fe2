"""What both connections share: a path quoted for the remote shell, and a failed command as an error.

Commands reach a site as shell text (troika's shape: an ``ssh`` argv in front of a quoted command),
so every path put into one goes through ``shell_path``, and a command that exits non-zero where the
caller asked for success is a ``RemoteCommandError`` naming the site, the command and its stderr.
"""

from __future__ import annotations

import shlex

from maelflow.errors import SiteError


def shell_path(path: str) -> str:
    """A path quoted for the remote shell, keeping a leading ``~/`` meaningful."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


class RemoteCommandError(SiteError):
    """A command on the site exited non-zero (``result`` holds its output)."""

    def __init__(self, target: str, command: str, result):
        self.result = result
        short = command if len(command) <= 200 else command[:200] + "..."
        detail = (result.stderr.strip() or result.stdout.strip())[-500:]
        super().__init__(f"{target}: `{short}` exited with {result.rc}: {detail}")
