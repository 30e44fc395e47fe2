"""What an entry of each collection must look like, and what the server adds to it.

The anemoi-registry client relies on a few server habits (reference/anemoi-registry-protocol.md §3):
new datasets and weights get an empty ``locations`` object and experiments empty ``plots`` and
``checkpoints`` lists, so that its JSON-patch ``add /locations/<platform>`` finds a parent; tasks get
a uuid, ``status: queued`` and naive-UTC ``created``/``updated`` stamps, because its workers do
``datetime.fromisoformat(updated)`` and subtract it from ``utcnow()``. Models are ours: a model is a
promoted checkpoint, its numbered versions never change once written, its aliases move.
"""

from __future__ import annotations

import datetime
import json
import uuid as uuid_mod
from typing import Any

from maelflow_registry.errors import BadRequest, Conflict, Unprocessable
from maelflow_registry.keys import COLLECTIONS, check_key, check_platform, dataset_name_problems

DEFAULT_CONTAINERS: dict[str, dict[str, Any]] = {
    "datasets": {"locations": dict},
    "weights": {"locations": dict},
    "experiments": {"plots": list, "checkpoints": list},
    "models": {"versions": dict, "aliases": dict},
}
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


def add_defaults(collection: str, record: dict) -> dict:
    for field, factory in DEFAULT_CONTAINERS.get(collection, {}).items():
        if field not in record or record[field] is None:
            record[field] = factory()
    return record


def new_record(collection: str, body: Any, key_from_url: str | None = None) -> tuple[str, dict]:
    """The key and record for a POST (``key_from_url`` None) or a PUT, with the server's defaults."""
    record = strip_hidden(require_object(body))
    main = COLLECTIONS[collection]
    if collection == "tasks":
        key = key_from_url or record.get("uuid") or str(uuid_mod.uuid4())
        if "uuid" in record and record["uuid"] != key:
            raise BadRequest(f"the body's uuid '{str(record['uuid'])[:80]}' differs from the URL's '{key}'")
        record["uuid"] = check_key(key, "task uuid")
        record.setdefault("status", "queued")
        stamp = now_iso()
        record["created"] = stamp
        record["updated"] = stamp
        if isinstance(record.get("action"), str):  # what the client does too: transfer_dataset -> transfer-dataset
            record["action"] = record["action"].lower().replace("_", "-")
        return key, add_defaults(collection, record)
    if key_from_url is not None:
        if main in record and record[main] != key_from_url:
            raise BadRequest(f"the body's {main} '{str(record[main])[:80]}' differs from the URL's '{key_from_url}'")
        record[main] = key_from_url
    if main not in record:
        raise BadRequest(f"a {collection} entry needs a '{main}' field: its key")
    key = check_key(record[main], f"{collection} {main}")
    return key, add_defaults(collection, record)


def validate(collection: str, key: str, record: Any, old: dict | None, *, naming: str = "anemoi",
             creating: bool = False) -> dict:
    """Raise a 4xx unless ``record`` may be stored as entry ``key``; ``old`` is the current record."""
    record = require_object(record, f"the {collection} entry")
    main = COLLECTIONS[collection]
    if record.get(main) != key:
        raise BadRequest(f"the field '{main}' is the entry's key '{key}' and cannot be changed or removed")
    if any(isinstance(k, str) and k.startswith("_") for k in record):
        raise BadRequest("top-level fields starting with '_' belong to the server and cannot be written")
    if collection == "datasets" and creating:
        problems = dataset_name_problems(key, naming)
        if problems:
            raise BadRequest(f"bad dataset name '{key}': " + "; ".join(problems),
                             hint="the server's dataset_naming setting is 'anemoi'; an admin may set 'relaxed'")
    if collection in ("datasets", "weights") and "locations" in record:
        locations = record["locations"]
        if not isinstance(locations, dict):
            raise BadRequest("'locations' must be an object of platform -> {\"path\": ...}")
        for platform, where in locations.items():
            check_platform(platform)
            if not isinstance(where, dict) or not isinstance(where.get("path"), (str, type(None))):
                raise BadRequest(f"location '{platform}' must be an object with a 'path' string")
    if collection == "tasks":
        if not isinstance(record.get("status"), str):
            raise BadRequest("a task's 'status' must be a string (queued, running, stopped...)")
        for stamp in ("created", "updated"):
            if not isinstance(record.get(stamp), str):
                raise BadRequest(f"a task's '{stamp}' must be an ISO-8601 string")
    if collection == "models":
        validate_model(record, old)
    if "protected" in record and not isinstance(record["protected"], bool):
        raise BadRequest("'protected' must be true or false")
    return record


def validate_model(record: dict, old: dict | None) -> None:
    versions, aliases = record.get("versions"), record.get("aliases")
    if not isinstance(versions, dict) or not isinstance(aliases, dict):
        raise Unprocessable("a model needs 'versions' (an object of number -> version) and 'aliases' "
                            "(an object of alias -> version number)")
    for number, version in versions.items():
        if not (isinstance(number, str) and number.isdigit() and not number.startswith("0")):
            raise Unprocessable(f"model version '{str(number)[:40]}' must be a positive whole number")
        if not isinstance(version, dict) or not isinstance(version.get("weights"), str):
            raise Unprocessable(f"model version {number} must be an object naming its checkpoint in 'weights'")
    for alias, number in aliases.items():
        if not isinstance(alias, str) or not alias or not alias.replace("-", "").replace("_", "").isalnum():
            raise Unprocessable(f"model alias '{str(alias)[:40]}' must use letters, digits, '-' and '_'")
        if str(number) not in versions:
            raise Unprocessable(f"alias '{alias}' points to version {str(number)[:20]}, which does not exist")
    for number, version in ((old or {}).get("versions") or {}).items():
        if versions.get(number) != version:
            raise Conflict(f"model version {number} is immutable: it cannot be changed or removed; "
                           "promote a new version and move the alias instead")


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


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def dataset_row(record: dict, created: str) -> dict:
    """The dataset table's columns, taken from the anemoi zarr metadata the client registers."""
    md = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    shape = md.get("shape") if isinstance(md.get("shape"), list) else []
    shape = [s if _int(s) is not None else None for s in shape] + [None] * 4
    variables = md.get("variables")
    n_variables = len(variables) if isinstance(variables, list) else shape[1]
    locations = record.get("locations") if isinstance(record.get("locations"), dict) else {}
    written = md.get("latest_write_timestamp") or md.get("created")
    return {
        "name": record.get("name"),
        "size": _int(md.get("total_size")),
        "files": _int(md.get("total_number_of_files")),
        "resolution": None if md.get("resolution") is None else str(md.get("resolution")),
        "frequency": None if md.get("frequency") is None else str(md.get("frequency")),
        "rows": shape[0],
        "variables": n_variables,
        "ensembles": shape[2],
        "grid_values": shape[3],
        "created": (str(written) if isinstance(written, str) else created)[:19].replace("T", " "),
        "locations": ",".join(sorted(locations)),
        "status": record.get("status") if isinstance(record.get("status"), str) else None,
    }


def search_text(collection: str, key: str, record: dict) -> str:
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
