"""What can go wrong in a transfer, each kind with a message an operator can act on.

Every error is a ``TransferError``; the subclasses let callers (the CLI's exit codes, the worker's
task status, tests) tell them apart without parsing messages. Like maelflow's own errors (this
library does not import maelflow) each carries a ``hint`` and an ``exit_code``: an error raised
below (a site's credential failure, say) keeps its hint when it is translated into a transfer error.
"""

from __future__ import annotations


class TransferError(RuntimeError):
    """A transfer failed in a way the user can act on; the message (or the hint) says how."""

    exit_code = 1

    def __init__(self, message: str = "", hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint and self.hint not in self.message:
            return f"{self.message}; {self.hint}"
        return self.message


class CredentialsError(TransferError):
    """The object store refused the access key or its signature."""


class NotPublished(TransferError):
    """The dataset has no manifest in the store (never published, or its publish did not finish)."""


class DiskFull(TransferError):
    """Not enough free space at the destination."""


def disk_error(exc: OSError, where: str) -> TransferError | OSError:
    """``exc`` as a DiskFull when the disk or the quota is full (here, or on a site that says so),
    else ``exc`` itself."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"{where}: no space left on the device (or the quota is exhausted); free some "
                        "space and run the stage again: it continues where it stopped")
    return exc


class ChecksumMismatch(TransferError):
    """An object's bytes do not match the manifest, even after fetching it again."""

    def __init__(self, message: str, key: str, hint: str | None = None):
        super().__init__(message, hint)
        self.key = key


class SourceChanged(TransferError):
    """The folder being published changed while it was read: its manifest would lie."""


class StoreError(TransferError):
    """The object store failed (missing bucket or object, errors and time-outs after retries)."""


class TransientError(Exception):
    """A failure worth retrying with back-off (a reset connection, a time-out, a 5xx answer).

    Not a TransferError: it never reaches a user; after the last retry it becomes a StoreError."""


class DestinationConflict(TransferError):
    """The destination exists and holds something other than this published dataset."""
