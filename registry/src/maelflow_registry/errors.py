"""Errors that become HTTP answers: each carries its status and a message a person can act on.

The anemoi-registry client retries 5xx answers for up to an hour (60 tries, 60 s apart), so every
problem caused by a request must be one of these 4xx errors, never an unhandled exception.
"""

from __future__ import annotations


class CatalogueError(Exception):
    status = 400
    title = "bad request"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self) -> dict:
        body = {"error": self.title, "status": self.status, "message": self.message}
        body.update(self.details)
        return body


class BadRequest(CatalogueError):
    status, title = 400, "bad request"


class Unauthorized(CatalogueError):
    status, title = 401, "unauthorized"


class Forbidden(CatalogueError):
    status, title = 403, "forbidden"


class NotFound(CatalogueError):
    status, title = 404, "not found"


class Conflict(CatalogueError):
    status, title = 409, "conflict"


class PreconditionFailed(CatalogueError):
    status, title = 412, "precondition failed"


class TooLarge(CatalogueError):
    status, title = 413, "request body too large"


class Unprocessable(CatalogueError):
    status, title = 422, "invalid entry"


class StoreUnavailable(CatalogueError):
    """S3 could not be reached: the one 5xx we answer, because retrying later may well work."""

    status, title = 503, "store unavailable"


class Ambiguous(CatalogueError):
    """An ID names entries of several collections; the answer lists them."""

    status, title = 409, "ambiguous"

    def __init__(self, ident: str, found: list[tuple[str, str]]):
        super().__init__(f"'{ident}' names {len(found)} entries; say which with collection/key",
                         candidates=[f"{c}/{k}" for c, k in found])
