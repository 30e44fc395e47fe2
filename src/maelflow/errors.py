"""maelflow's errors: one root, a few families, and one rule: a hint is never lost.

Why a root: the CLI maps every failure to a message, a hint and an exit status in one handler
(``cli/common.py``), and a suite task does the same in its job output. Why families: a caller
decides by kind (the credential must be renewed by a person, the connection may be retried, the
config must be edited), not by message. Why ``hint`` is a field: an error translated on its way up
(an SSH credential failure inside a transfer inside a suite task) keeps the sentence that tells the
operator what to do, e.g. how to renew a 2FA session.

The two libraries of this repository (``maelflow_transfer``, ``maelflow_registry``) never import
maelflow; their roots (``TransferError``, ``CatalogueError``) follow the same convention
(``hint``, ``exit_code``) and are listed in ``HANDLED`` for the CLI's handler.
"""

from __future__ import annotations


class MaelflowError(Exception):
    """A failure with a message for the person reading it, a hint of what to do, an exit status."""

    exit_code: int = 1

    def __init__(self, message: str = "", hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        if self.hint and self.hint not in self.message:
            return f"{self.message}; {self.hint}"
        return self.message


# ------------------------------------------------------------------------------------- config
class ConfigurationError(MaelflowError):
    """The configuration (or a command's arguments) cannot be used; nothing was changed."""

    exit_code = 2


# ------------------------------------------------------------------------------------- sites
class SiteError(MaelflowError):
    """A site could not be used (see the subclasses for why)."""


class CredentialError(SiteError):
    """The credential is missing, expired or refused: only the operator can fix it (the hint)."""


class HostKeyError(SiteError):
    """The login node's host key is unknown or changed: never connect blindly to such a host."""


class RemoteTimeout(SiteError):
    """A remote command outlived its timeout; it may still be running there."""


class ConnectionLost(SiteError, ConnectionError):
    """The connection died (or could not be set up). ``sent`` says whether the command may have run:
    callers of non-idempotent commands must find out before trying again."""

    def __init__(self, message: str, sent: bool, hint: str | None = None):
        super().__init__(message, hint)
        self.sent = sent


class SubmitError(SiteError):
    """The scheduler refused a job, or its answer could not be read."""


# ------------------------------------------------------------------------------------- services
class ServiceFailure(MaelflowError):
    """A service maelflow starts or talks to (ecFlow, S3, MLflow, the catalogue) is not usable."""


def _library_roots() -> tuple[type[BaseException], ...]:
    roots: list[type[BaseException]] = [MaelflowError]
    try:
        from maelflow_transfer.errors import TransferError

        roots.append(TransferError)
    except ImportError:   # pragma: no cover - installed together by scripts/install.sh
        pass
    try:
        from maelflow_registry.errors import CatalogueError

        roots.append(CatalogueError)
    except ImportError:   # pragma: no cover
        pass
    return tuple(roots)


HANDLED: tuple[type[BaseException], ...] = _library_roots()


def hint_of(exc: BaseException) -> str | None:
    return getattr(exc, "hint", None)


def exit_code_of(exc: BaseException) -> int:
    return int(getattr(exc, "exit_code", 1) or 1)
