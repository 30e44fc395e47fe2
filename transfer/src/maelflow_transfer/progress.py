"""How far a transfer is: bytes and objects done, rate, ETA; shown wherever the transfer runs.

The transfer counts; sinks show. A sink gets a ``Snapshot`` at most every ``every`` seconds and
once at the end: the CLI draws a rich progress bar, a suite job sets its ``progress`` meter and
``rate`` label, a remote pull prints JSON lines that the CLI on the other end of the SSH session
turns back into snapshots. Objects already in place when a re-run starts count as done but not
into the rate, so the ETA of a resumed transfer is honest.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, TextIO

Sink = Callable[["Snapshot"], None]


@dataclass(frozen=True)
class Snapshot:
    bytes_done: int
    bytes_total: int
    objects_done: int
    objects_total: int
    bytes_moved: int          # this run's transferred bytes (excludes what was already there)
    elapsed: float
    final: bool = False

    @property
    def rate(self) -> float:
        return self.bytes_moved / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        left = self.bytes_total - self.bytes_done
        if left <= 0:
            return 0.0
        return left / self.rate if self.rate > 0 else None

    @property
    def percent(self) -> int:
        if not self.bytes_total:
            return 100 if self.objects_done >= self.objects_total else 0
        return int(100 * self.bytes_done / self.bytes_total)

    def text(self) -> str:
        eta = "?" if self.eta is None else f"{self.eta:.0f}s"
        return (f"{self.objects_done}/{self.objects_total} objects, {mib(self.bytes_done)}/{mib(self.bytes_total)} MiB, "
                f"{self.rate / 2**20:.1f} MiB/s, ETA {eta}")

    def to_json(self) -> str:
        return json.dumps({"progress": asdict(self)})

    @classmethod
    def from_json(cls, line: str) -> "Snapshot | None":
        try:
            data = json.loads(line)
            return cls(**data["progress"])
        except (ValueError, KeyError, TypeError):
            return None


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


class Progress:
    """Thread-safe counters feeding sinks, throttled."""

    def __init__(self, sinks: list[Sink] | None = None, every: float = 0.5):
        self.sinks = list(sinks or [])
        self.every = every
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.bytes_total = self.objects_total = 0
        self.bytes_done = self.objects_done = self.bytes_moved = 0
        self._last = 0.0

    def start(self, bytes_total: int, objects_total: int) -> None:
        with self.lock:
            self.bytes_total, self.objects_total = bytes_total, objects_total
            self.t0 = time.monotonic()
        self._emit(force=True)

    def skipped(self, nbytes: int, objects: int = 1) -> None:
        """Already in place: done, but not moved by this run."""
        with self.lock:
            self.bytes_done += nbytes
            self.objects_done += objects
        self._emit()

    def moved(self, nbytes: int) -> None:
        """Bytes moved (negative to take back a failed try's bytes)."""
        with self.lock:
            self.bytes_done += nbytes
            self.bytes_moved += nbytes
        self._emit()

    def object_done(self) -> None:
        with self.lock:
            self.objects_done += 1
        self._emit()

    def snapshot(self, final: bool = False) -> Snapshot:
        with self.lock:
            return Snapshot(self.bytes_done, self.bytes_total, self.objects_done, self.objects_total,
                            self.bytes_moved, time.monotonic() - self.t0, final)

    def finish(self) -> Snapshot:
        snap = self.snapshot(final=True)
        for sink in self.sinks:
            sink(snap)
        return snap

    def _emit(self, force: bool = False) -> None:
        if not self.sinks:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        with self.lock:
            if not force and now - self._last < self.every:
                return
            self._last = now
        snap = self.snapshot()
        for sink in self.sinks:
            sink(snap)


# ------------------------------------------------------------------------------------- sinks
def reporter_sink(reporter) -> Sink:
    """ecFlow: the task's ``progress`` meter (percent) and ``rate`` label (rate, ETA), from the job."""
    def sink(s: Snapshot) -> None:
        if s.final:
            reporter.meter("progress", s.percent)
            reporter.label("rate", s.text())
            return
        reporter.throttled("meter", "progress", s.percent, every=1.0)
        reporter.throttled("label", "rate", s.text(), every=1.0)
    return sink


def json_sink(stream: TextIO = sys.stdout) -> Sink:
    """One JSON line per snapshot, for a CLI reading a remote transfer over SSH."""
    def sink(s: Snapshot) -> None:
        stream.write(s.to_json() + "\n")
        stream.flush()
    return sink


class RichBar:
    """The CLI's progress bar: bytes, objects, rate, ETA. A context manager; ``sink`` feeds it."""

    def __init__(self, description: str, console=None):
        from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                                TextColumn("{task.fields[objects]}"), TransferSpeedColumn(), TimeRemainingColumn(),
                                console=console, transient=False)
        self.task = self.bar.add_task(description, total=None, objects="")

    def __enter__(self) -> "RichBar":
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def sink(self, s: Snapshot) -> None:
        self.bar.update(self.task, total=s.bytes_total or None, completed=s.bytes_done,
                        objects=f"{s.objects_done}/{s.objects_total} objects")
