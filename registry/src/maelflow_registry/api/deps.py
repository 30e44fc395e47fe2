"""What every route receives: the catalogue, the caller (found by the one token parser), typed parameters.

Routes declare what they need as typed parameters, as in the FastAPI template's ``deps.py``:
``caller: Writer`` makes a route need a token with the write role, ``cat: CatalogueDep`` gives it
the catalogue. The ``Authorization`` header is read in one place, :func:`identify`, and the role
checked in one place, :func:`authorise`; the fast-lookup middleware calls both, so a token means the
same thing on every path. "Bearer None" is no token (the anemoi-registry client sends it when it has
none); a browser may instead send the token kept in the login cookie, for the web pages only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Awaitable, Callable, Mapping

from fastapi import Depends, Path, Request

from maelflow_registry import collections
from maelflow_registry.auth import TokenInfo, hash_token, role_allows
from maelflow_registry.catalogue import Catalogue
from maelflow_registry.config import Settings
from maelflow_registry.errors import Forbidden, Unauthorized
from maelflow_registry.keys import KEY_MAX, KEY_RE

COOKIE = "catalogue_token"


@dataclass
class Context:
    """What the routes share: the catalogue, the tokens file (watched for changes), the S3 endpoint."""

    catalogue: Catalogue
    tokens: Callable[[], Mapping[str, TokenInfo]]
    s3_endpoint: str | None = None

    def settings(self) -> Settings:
        return self.catalogue.settings


@dataclass(frozen=True)
class Caller:
    role: str | None  # None: anonymous
    name: str


ANONYMOUS = Caller(None, "anonymous")


def identify(authorization: str | None, tokens: Callable[[], Mapping[str, TokenInfo]],
             cookie: str | None = None) -> Caller:
    """Who sent the request: anonymous without a token; 401 for another scheme or an unknown token."""
    token = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized("use 'Authorization: Bearer <token>'")
        value = value.strip()
        if value and value not in ("None", "null"):
            token = value
    if token is None and cookie:
        token = cookie
    if token is None:
        return ANONYMOUS
    info = tokens().get(hash_token(token))
    if info is None:
        raise Unauthorized("unknown or revoked token")
    return Caller(info.role, info.name)


def authorise(caller: Caller, needed: str, settings: Callable[[], Settings]) -> Caller:
    """``caller`` if it may do what needs the ``needed`` role (reads may be anonymous); 401/403 otherwise."""
    if caller.role is None:
        if needed == "read" and settings().anonymous_read:
            return caller
        raise Unauthorized(f"this needs a token with the '{needed}' role: send 'Authorization: Bearer <token>' "
                           f"(an operator creates one with: maelflow catalogue token create --role {needed})")
    if not role_allows(caller.role, needed):
        raise Forbidden(f"this token has the '{caller.role}' role; this request needs '{needed}'")
    return caller


def context(request: Request) -> Context:
    return request.app.state.ctx


# dependencies are async where they do not block: FastAPI runs a plain function in the thread pool
async def _context(request: Request) -> Context:
    return context(request)


async def _catalogue(request: Request) -> Catalogue:
    return context(request).catalogue


def require(needed: str, *, cookies: bool = False) -> Callable[[Request], Awaitable[Caller]]:
    """A dependency: the caller, if allowed to do what needs ``needed`` (``cookies``: web pages)."""

    async def caller(request: Request) -> Caller:
        ctx = context(request)
        found = identify(request.headers.get("authorization"), ctx.tokens,
                         request.cookies.get(COOKIE) if cookies else None)
        return authorise(found, needed, ctx.settings)

    return caller


async def anyone(request: Request) -> Caller:
    return identify(request.headers.get("authorization"), context(request).tokens)


Reader = Annotated[Caller, Depends(require("read"))]
Writer = Annotated[Caller, Depends(require("write"))]
Admin = Annotated[Caller, Depends(require("admin"))]
PageReader = Annotated[Caller, Depends(require("read", cookies=True))]
Anyone = Annotated[Caller, Depends(anyone)]
CatalogueDep = Annotated[Catalogue, Depends(_catalogue)]
ContextDep = Annotated[Context, Depends(_context)]

# -- path parameters ------------------------------------------------------------------------------
KEY_PATTERN = KEY_RE.pattern
# the registered collections, for the OpenAPI document and 422s that list them
CollectionName = enum.Enum("CollectionName", {name: name for name in collections.names()}, type=str)
Key = Annotated[str, Path(max_length=KEY_MAX, pattern=KEY_PATTERN)]
Alias = Annotated[str, Path(max_length=64, pattern=KEY_PATTERN)]
