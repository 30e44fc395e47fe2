"""Exponential back-off with jitter, for the failures that a second try can fix."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    attempts: int = 6          # tries in all, the first one included
    base: float = 0.25         # seconds before the second try
    cap: float = 8.0           # no single wait is longer

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (0-based): base * 2^n, +-25 % jitter."""
        d = min(self.cap, self.base * (2 ** attempt))
        return d * random.uniform(0.75, 1.25)

    def sleep(self, attempt: int, stop: threading.Event | None = None) -> None:
        """Wait before the next try; returns early when ``stop`` is set (another worker failed)."""
        d = self.delay(attempt)
        if stop is not None:
            stop.wait(d)
        else:
            time.sleep(d)


DEFAULT = Backoff()
