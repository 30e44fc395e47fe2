"""What the server does to a record of any collection: stamps, server fields, filters and search words.

What differs between collections (their key field, default containers, rules) is declared in
:mod:`maelflow_registry.collections`; this module holds what is the same for all of them.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from maelflow_registry.errors import BadRequest

MAX_INDEXED_VALUE = 1000


def now_iso() -> str:
    """Naive ISO-8601 UTC with microseconds: what the anemoi workers can parse and compare."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds")


def strip_hidden(record: dict) -> dict:
    """Top-level ``_`` keys are the server's (``_original``, ``_version``...): never taken from a client."""
    return {k: v for k, v in record.items() if not (isinstance(k, str) and k.startswith("_"))}


def require_object(body: Any, what: str = "the request body") -> dict:
    if not isinstance(body, dict):
        raise BadRequest(f"{what} must be a JSON object, not {type(body).__name__ if body is not None else 'null'}")
    return body


def text_value(value: Any) -> str | None:
    """How a scalar is compared with a query-string filter: strings as they are, others as JSON."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, (int, float)):
        text = json.dumps(value)
    else:
        return None
    return text if len(text) <= MAX_INDEXED_VALUE else None


def filter_fields(record: dict) -> list[tuple[str, str]]:
    """The (field, value) pairs a list filter can match exactly.

    A filter ``k=v`` matches a top-level ``k``, or, where the record has no top-level ``k``,
    ``metadata.k`` (so ``GET /datasets?uuid=U`` finds the dataset whose ``metadata.uuid`` is U, as the
    client's ``update -Z`` needs). ``metadata.k=v`` names the nested field explicitly.
    """
    pairs: dict[tuple[str, str], None] = {}
    for k, v in record.items():
        text = text_value(v)
        if text is not None:
            pairs[(k, text)] = None
    metadata = record.get("metadata")
    if isinstance(metadata, dict):
        for k, v in metadata.items():
            text = text_value(v)
            if text is None:
                continue
            pairs[(f"metadata.{k}", text)] = None
            if k not in record:
                pairs[(k, text)] = None
    return list(pairs)


def query_values(value: str) -> list[str]:
    """A filter value and its spelling as JSON for Python-style booleans (``True`` -> ``true``)."""
    return [value, value.lower()] if value in ("True", "False") else [value]


def search_text(key: str, record: dict) -> str:
    """What the web search box looks through: the key, status, owner and a few descriptive fields."""
    md = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    words = [key]
    for source in (record, md):
        for field in ("status", "owner", "description", "title", "run_id", "action", "dataset", "resolution",
                      "frequency", "attribution", "licence", "name"):
            value = source.get(field)
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                words.append(str(value))
    if isinstance(md.get("variables"), list):
        words.extend(str(v) for v in md["variables"][:500])
    if isinstance(record.get("locations"), dict):
        words.extend(record["locations"])
    return " ".join(words).lower()
