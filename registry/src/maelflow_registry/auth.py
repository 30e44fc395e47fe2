"""Bearer tokens with read, write and admin roles, kept hashed in the catalogue's ``tokens.json``.

A token is 32 random bytes (``mfc_`` + URL-safe base64), printed once when created. Only its SHA-256
is stored: with that much entropy a fast hash is enough (a slow password hash protects guessable
secrets, and these are not guessable), and it keeps the per-request check to one dictionary lookup.
The file is written with mode 0600 and replaced atomically; revoking a token removes its hash.

Every read-modify-write of the file (create, revoke, the service token's first use) holds an
exclusive ``flock`` on ``.tokens.lock`` beside it, across the read and the write: without it a
``token create`` running alongside a ``revoke`` could write back the list it read before the revoke,
and the revoked token would come back. Readers (the server's per-request lookup) take no lock: the
file is replaced atomically, so they see the old list or the new one.

Roles are ordered: read < write < admin. Deleting entries needs admin (tasks excepted: workers
delete the tasks they finish with a write token, as the anemoi-registry client does).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from typing import Iterator

from maelflow_registry.config import Paths, write_atomic

ROLES = ("read", "write", "admin")
PREFIX = "mfc_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class TokenInfo:
    id: str
    name: str
    role: str
    created: str


class TokenStore:
    def __init__(self, paths: Paths):
        self.paths = paths

    def _read(self) -> dict:
        try:
            data = json.loads(self.paths.tokens.read_text())
        except FileNotFoundError:
            return {"tokens": []}
        return data if isinstance(data.get("tokens"), list) else {"tokens": []}

    def _write(self, data: dict) -> None:
        write_atomic(self.paths.tokens, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o600)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the token store's exclusive lock (other processes and threads wait for it)."""
        self.paths.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.paths.tokens_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def create(self, role: str, name: str | None = None) -> tuple[str, TokenInfo]:
        """A new token (returned once, never stored) and its record."""
        if role not in ROLES:
            raise ValueError(f"unknown role '{role}': choose one of {', '.join(ROLES)}")
        with self.locked():
            return self._create(role, name)

    def _create(self, role: str, name: str | None) -> tuple[str, TokenInfo]:
        token = PREFIX + secrets.token_urlsafe(32)
        info = TokenInfo(id=secrets.token_hex(4), name=name or f"{role}-token",
                         role=role, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        data = self._read()
        data["tokens"].append({"id": info.id, "name": info.name, "role": role, "created": info.created,
                               "sha256": hash_token(token)})
        self._write(data)
        return token, info

    def revoke(self, which: str) -> list[TokenInfo]:
        """Remove tokens whose id or name is ``which``, or which ``which`` itself is; returns them."""
        with self.locked():
            return self._revoke(which)

    def _revoke(self, which: str) -> list[TokenInfo]:
        data = self._read()
        digest = hash_token(which)
        keep, gone = [], []
        for t in data["tokens"]:
            if which in (t.get("id"), t.get("name")) or hmac.compare_digest(t.get("sha256", ""), digest):
                gone.append(TokenInfo(t["id"], t["name"], t["role"], t.get("created", "")))
            else:
                keep.append(t)
        if gone:
            data["tokens"] = keep
            self._write(data)
        return gone

    def _kept_service_token(self) -> str | None:
        """The kept service token while it is still valid (not revoked), else None."""
        try:
            token = self.paths.service_token.read_text().strip()
        except FileNotFoundError:
            return None
        return token if token and hash_token(token) in self.by_hash() else None

    def service_token(self, name: str = "service") -> str:
        """The caller's own write token (for its tasks on this host), made on first use and kept 0600.

        Made under the store's lock, so two first uses at once make one token, not two (with one of
        them lost). A kept token that is no longer in the store (revoked) is replaced by a new one.
        """
        token = self._kept_service_token()
        if token:
            return token
        with self.locked():
            token = self._kept_service_token()      # made meanwhile by another process
            if token:
                return token
            token, _ = self._create("write", name)
            write_atomic(self.paths.service_token, token + "\n", mode=0o600)
            return token

    def list(self) -> list[TokenInfo]:
        return [TokenInfo(t["id"], t["name"], t["role"], t.get("created", "")) for t in self._read()["tokens"]]

    def by_hash(self) -> dict[str, TokenInfo]:
        """sha256 -> token, for the server's per-request lookup (reloaded when the file changes)."""
        return {t["sha256"]: TokenInfo(t["id"], t["name"], t["role"], t.get("created", ""))
                for t in self._read()["tokens"] if t.get("role") in ROLES and t.get("sha256")}


def role_allows(role: str | None, needed: str) -> bool:
    return role is not None and ROLES.index(role) >= ROLES.index(needed)
