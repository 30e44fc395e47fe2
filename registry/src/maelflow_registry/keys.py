"""The strict rules that keep keys, platform names and artefact paths safe to use as S3 names and URLs.

An entry's key becomes part of an S3 object name (``entries/<collection>/<shard>/<key>.json``) and of web
URLs, so it is checked before anything else happens: one segment, no ``/``, no ``..``, no control
or percent characters. Path traversal is then impossible by construction rather than by escaping.
"""

from __future__ import annotations

import re

from maelflow_registry.errors import BadRequest

KEY_MAX = 200
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# platforms (location names) are used as JSON-pointer segments and by the client's worker, which
# refuses '.' and '/' in them
PLATFORM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
ARTEFACT_MAX_DEPTH = 12


def check_key(key: object, what: str = "key") -> str:
    """Raise BadRequest unless ``key`` is one safe path segment."""
    if not isinstance(key, str) or not key:
        raise BadRequest(f"the {what} must be a non-empty string")
    if len(key) > KEY_MAX:
        raise BadRequest(f"the {what} is {len(key)} characters long; at most {KEY_MAX} are allowed")
    if "/" in key or "\\" in key or ".." in key:
        raise BadRequest(f"the {what} '{_show(key)}' contains '/', '\\' or '..': a key is one path segment")
    if not KEY_RE.match(key):
        raise BadRequest(f"the {what} '{_show(key)}' is not valid: use letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit")
    return key


def segment_problem(value: object) -> str | None:
    """Why ``value`` is not one safe path segment (the transfer worker's rule); None when it is.

    A task's ``dataset``, ``source`` and ``destination`` become folder and site names on a worker's
    disk; the worker checks them with the same rule before it stages (``maelflow_transfer.paths``), and
    the server checks them when the task is written, so a bad one is refused where it is made.
    """
    if not isinstance(value, str):
        return f"it is a {type(value).__name__}, not a string"
    if not value:
        return "it is empty"
    if len(value) > KEY_MAX:
        return f"it is {len(value)} characters long; at most {KEY_MAX} are allowed"
    if "/" in value or "\\" in value:
        return "it contains '/' or '\\': it must be one path segment"
    if value in (".", ".."):
        return f"it is {value!r}"
    for ch in value:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"it contains the control character {ch!r}"
    return None


def check_segment(value: object, what: str = "name") -> str:
    """Raise BadRequest unless ``value`` is one safe path segment (see :func:`segment_problem`)."""
    problem = segment_problem(value)
    if problem:
        raise BadRequest(f"the {what} '{_show(value)}' is not valid: {problem}")
    return value  # type: ignore[return-value]


def check_platform(name: object) -> str:
    if not isinstance(name, str) or not PLATFORM_RE.match(name):
        raise BadRequest(f"the location (platform) name '{_show(name)}' is not valid: use letters, digits, "
                         "'_' and '-' (no '.' or '/'), at most 64 characters")
    return name


def check_artefact_path(path: str) -> str:
    """An artefact path: up to 12 safe segments separated by '/'; never '..' or an empty segment."""
    if not isinstance(path, str) or not path:
        raise BadRequest("the artefact path must not be empty")
    parts = path.split("/")
    if len(parts) > ARTEFACT_MAX_DEPTH:
        raise BadRequest(f"the artefact path has {len(parts)} segments; at most {ARTEFACT_MAX_DEPTH} are allowed")
    for part in parts:
        if part in ("", ".", "..") or ".." in part or not SEGMENT_RE.match(part):
            raise BadRequest(f"the artefact path '{_show(path)}' is not valid: each segment must use letters, "
                             "digits, '.', '_' and '-', and '..' or empty segments are refused")
    return path


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)[1:-1] if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
