"""Names that come from the store or a site, checked before they become paths on a disk.

A manifest's object keys, a catalogue task's dataset name and a site's file listing are written by
someone else (anyone holding the S3 key, a catalogue write token, a site's user). Joined to a
destination as they are, ``../../x`` or ``/etc/x`` would make a stage create, rename or delete files
outside its folder. So every such name is checked where it is read (``key_problem``, ``check_key``,
``check_segment``), and every write checks that it lands inside its destination after symlinks
are followed (``inside``, ``check_inside``), in case a folder on the way was swapped for a link.

Part of the transfer library: it does not import maelflow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from maelflow_transfer.errors import TransferError

RULE = ("a key is a relative path of plain segments: no empty, '.' or '..' segment, no leading '/', "
        "no backslash, NUL, newline or other control character")


class UnsafePath(TransferError):
    """A key, name or path from the store or a site would land outside its place; refused."""

    def __init__(self, message: str, key: object = None, hint: str | None = None):
        super().__init__(message, hint)
        self.key = key


def show(value: object, limit: int = 120) -> str:
    """``value`` for a message: quoted, control characters escaped, cut at ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _char_problem(text: str) -> str | None:
    if "\\" in text:
        return "it contains a backslash"
    for ch in text:
        if ch == "\0":
            return "it contains a NUL character"
        if ch in "\n\r":
            return "it contains a line break"
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"it contains the control character {ch!r}"
    return None


def key_problem(key: object) -> str | None:
    """Why ``key`` is not a safe relative key (``a/b/c``, '/'-separated); None when it is."""
    if not isinstance(key, str):
        return f"it is a {type(key).__name__}, not a string"
    if not key:
        return "it is empty"
    if key.startswith("/"):
        return "it is an absolute path"
    problem = _char_problem(key)
    if problem:
        return problem
    for segment in key.split("/"):
        if segment == "":
            return "it has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"it has a {segment!r} segment"
    return None


def segment_problem(name: object) -> str | None:
    """Why ``name`` is not one safe path segment (a dataset name, a file name); None when it is."""
    if isinstance(name, str) and "/" in name:
        return "it contains '/': it must be one path segment"
    return key_problem(name)


def check_key(key: object, what: str = "object key") -> str:
    """``key`` if it is a safe relative key, else UnsafePath naming it."""
    problem = key_problem(key)
    if problem:
        raise UnsafePath(f"unsafe {what} {show(key)}: {problem}; refused ({RULE})", key)
    return key  # type: ignore[return-value]


def check_segment(name: object, what: str = "dataset name") -> str:
    """``name`` if it is one safe path segment, else UnsafePath naming it."""
    problem = segment_problem(name)
    if problem:
        raise UnsafePath(f"unsafe {what} {show(name)}: {problem}; refused", name)
    return name  # type: ignore[return-value]


def check_keys(keys: Iterable[object], dataset: object) -> None:
    """Every key of ``dataset``'s manifest is safe and listed once, else UnsafePath naming the
    dataset and the first bad key."""
    seen: set[str] = set()
    for key in keys:
        problem = key_problem(key)
        if problem is None and key in seen:
            problem = "it is listed twice"
        if problem:
            raise UnsafePath(f"the manifest of dataset {show(dataset)} lists the object key {show(key)}: "
                             f"{problem}; the dataset is refused ({RULE})", key,
                             hint="publish the dataset again from a trusted copy")
        seen.add(key)  # type: ignore[arg-type]


def inside(root: Path | str, key: str) -> Path:
    """``root/key`` once ``key`` is a safe key and the path, symlinks followed, stays under ``root``
    (symlinks followed too); UnsafePath otherwise. For every local write under a destination."""
    check_key(key)
    return check_inside(root, Path(root) / key)


def check_inside(root: Path | str, path: Path | str) -> Path:
    """``path`` if, with every symlink on the way resolved, it is ``root`` or under it."""
    base = Path(os.path.realpath(root))
    target = Path(os.path.realpath(path))
    if target != base and not target.is_relative_to(base):
        raise UnsafePath(f"{path} resolves to {target}, outside {root}; refused (a symlink on the way?)",
                         str(path))
    return Path(path)


def listing_entry(rel: object, where: str) -> str:
    """One relative path of a site's file listing (``find -printf '%P\\0'``), checked like a key."""
    problem = key_problem(rel)
    if problem:
        raise UnsafePath(f"the listing of {where} has the entry {show(rel)}: {problem}; refused", rel)
    return rel  # type: ignore[return-value]
