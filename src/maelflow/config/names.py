"""ecFlow node names allow [A-Za-z0-9_.] only; config names may also hold '-'."""

import re

_BAD = re.compile(r"[^A-Za-z0-9_.]")


def node_name(name: str) -> str:
    out = _BAD.sub("_", name)
    return out if out[:1].isalnum() or out[:1] == "_" else f"_{out}"
