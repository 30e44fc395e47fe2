"""What a running job tells ecFlow: meters, labels, events, and why it failed.

Inside a suite job the environment names the task (ECF_NAME, ECF_PASS...). With ``direct``
reporting the child commands go to the server; with ``relay`` they are appended to the site's spool
and replayed by maelflow on the login side. Outside a job (a user running ``maelflow transfer``
by hand) the reporter does nothing, so library code can report unconditionally.
"""

from __future__ import annotations

import os
import time


class Reporter:
    def __init__(self, env: dict[str, str] | None = None):
        self.env = dict(os.environ if env is None else env)
        # under the scheduler's launcher (SLURM: srun) every rank runs the step: only rank 0 speaks;
        # the job's header names the variable that holds the rank (MAELFLOW_RANK_VAR, from the scheduler)
        rank_var = self.env.get("MAELFLOW_RANK_VAR", "")
        self.active = bool(self.env.get("ECF_NAME") and self.env.get("ECF_PASS")) and \
            (not rank_var or self.env.get(rank_var, "0") == "0")
        self.mode = self.env.get("MAELFLOW_REPORT", "direct")
        self._last: dict[tuple[str, str], float] = {}
        self._client = None

    # -- child commands -------------------------------------------------------------------------
    def meter(self, name: str, value: int) -> None:
        self._send("meter", name, str(int(value)))

    def label(self, name: str, text: str) -> None:
        # one line, and no '#': ecFlow's definition format (used when a client syncs in full, and in
        # checkpoints) reads it as the start of a comment and the rest of the label is lost
        self._send("label", name, " ".join(str(text).replace("#", "%23").split()) or " ")

    def event(self, name: str, value: bool = True) -> None:
        self._send("event", name, "set" if value else "clear")

    def throttled(self, kind: str, name: str, value, every: float = 1.0) -> None:
        """Meters and labels from a hot loop: at most one update per ``every`` seconds per attribute."""
        now = time.monotonic()
        if now - self._last.get((kind, name), 0.0) < every:
            return
        self._last[(kind, name)] = now
        getattr(self, kind)(name, value)

    def abort_reason(self, text: str) -> None:
        """Leave the reason for the job header, which sends the abort once the step has exited."""
        path = self.env.get("MAELFLOW_ABORT_FILE")
        if path:
            with open(path, "w", encoding="utf-8") as fh:
                # the header reads 400 bytes: cut here, on a character
                fh.write(abort_text(text).encode()[:400].decode("utf-8", "ignore"))

    # -- transport ---------------------------------------------------------------------------
    def _send(self, kind: str, name: str, value: str) -> None:
        if not self.active:
            return
        if self.mode == "relay":
            from maelflow.spool import append, from_env

            append(self.env["MAELFLOW_SPOOL"], from_env(kind, (name, value), self.env))
            return
        client = self._direct_client()
        if kind == "meter":
            client.child_meter(name, int(value))
        elif kind == "label":
            client.child_label(name, value)
        elif kind == "event":
            client.child_event(name, value == "set")

    def _direct_client(self):
        if self._client is None:
            import ecflow

            c = ecflow.Client(self.env.get("ECF_HOST", "localhost"), self.env["ECF_PORT"])
            c.set_child_path(self.env["ECF_NAME"])
            c.set_child_password(self.env["ECF_PASS"])
            c.set_child_pid(self.env.get("ECF_RID", str(os.getpid())))
            c.set_child_try_no(int(self.env.get("ECF_TRYNO", "1")))
            c.set_child_timeout(int(self.env.get("ECF_TIMEOUT", "300")))
            self._client = c
        return self._client


def abort_text(reason: str) -> str:
    """The reason as one line that ecFlow's definition format reads back.

    ecflow 5.9 stores the reason in the task's line of the definition and, reading it back (every
    client that syncs in full, and the server's checkpoint), looks for its own ``rt:``, ``dur:``,
    ``try:``, ``flag:`` and ``state:`` anywhere on that line: a reason such as "port: 50171" made
    every later sync of the server fail. So ':' becomes the look-alike U+2236 and '#' (the start of a
    comment there) %23; labels are quoted and keep theirs.
    """
    return " ".join(str(reason).replace("#", "%23").replace(":", "\u2236").split())


def child_abort(env: dict[str, str], reason: str) -> None:
    """Abort a task on its behalf (its process is gone and cannot say so itself).

    Runs where the ecFlow server is reachable (the kill or status command), so it always talks to
    the server directly, whatever the site's reporting mode.
    """
    if not (env.get("ECF_NAME") and env.get("ECF_PASS")):
        return
    r = Reporter({**env, "MAELFLOW_REPORT": "direct"})
    client = r._direct_client()
    client.child_abort(abort_text(reason))
