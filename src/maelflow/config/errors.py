"""Configuration problems, each pointing at a file, a field path and the value that is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from pydantic import ValidationError

from maelflow.errors import ConfigurationError


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    field: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field or '<top>'} = {self.value!r}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        value = self.value if isinstance(self.value, (str, int, float, bool, type(None), list, dict)) else repr(self.value)
        return {"file": self.file, "field": self.field, "value": value, "reason": self.reason}


class ConfigError(ConfigurationError):
    """One or more problems; nothing is generated from a config that raised this."""

    def __init__(self, problems: Iterable[ConfigProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


_MISSING = "<missing>"


def field_path(loc: Iterable[Any], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def problems_from_validation(err: ValidationError, file: str, prefix: str = "") -> list[ConfigProblem]:
    problems = []
    for e in err.errors(include_url=False):
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        reason = e["msg"]
        if reason.startswith("Value error, "):
            reason = reason[len("Value error, "):]
        value = e.get("input", _MISSING)
        if e["type"] == "missing":
            value = _MISSING
            reason = "required field is missing"
        elif e["type"] == "extra_forbidden":
            reason = "unknown field (check the spelling; see docs/configuration.md)"
        problems.append(ConfigProblem(file, field_path(loc, prefix), value, reason))
    return problems
