"""What a collection is: its key, defaults, rules, lineage edges and pages, declared in one class.

A collection is a subclass of :class:`Collection` (in anemoi-registry's ``entry/weights.py`` shape:
the name and ``main_key`` at the top, its behaviour in one class). Class attributes carry what is
data (key field, titles, default containers, who may delete, the lineage column, the templates);
methods carry what is behaviour (extra validation, lineage edges, the cells of its web table).
The rules every collection shares live here, once: the key is one safe path segment, top-level
``_`` fields belong to the server, ``protected`` is a boolean, and ``locations`` (where declared)
is an object of platform -> ``{"path": ...}``.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Callable, ClassVar, Iterable, Protocol

from maelflow_registry.config import Settings
from maelflow_registry.errors import BadRequest
from maelflow_registry.keys import check_key, check_platform
from maelflow_registry.records import require_object, strip_hidden
from maelflow_registry.refs import ref, run_ref



class IndexView(Protocol):
    """What a collection's hooks may read of the catalogue's index (SQLite or PostgreSQL): the
    index knows the collections, the collections only this much of the index."""

    def get(self, collection: str, key: str) -> dict | None: ...

    def targets(self, refs: Iterable[str], relation: str, collection: str) -> list[str]: ...


class CatalogueView(Protocol):
    """What a collection's own operations (a model's promotion, an alias move) need of the catalogue:
    its index, and a versioned read-modify-write of one entry (``Catalogue.write``)."""

    index: IndexView

    def write(self, collection: str, key: str, mutate: Callable[[dict | None], dict], *, user: str,
              role: str | None, if_match: int | None = None,
              must_exist: bool | None = None) -> tuple[dict, int, bool]: ...

Cell = tuple[Any, "str | None"]  # (text, link) of a web table cell


def human_size(n: Any) -> str:
    """Bytes as a person reads them (web tables)."""
    if not isinstance(n, (int, float)):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Collection:
    # -- what it is --------------------------------------------------------------------------------
    name: ClassVar[str]                  # URL segment, S3 prefix and index name (lower case, letters and '_')
    main_key: ClassVar[str]              # the record field holding the entry's key
    title: ClassVar[str]                 # what a person calls them on the web pages ("Checkpoints")
    singular: ClassVar[str]              # one of them ("Checkpoint")
    aliases: ClassVar[tuple[str, ...]] = ()   # other web paths that redirect to its table ("/checkpoints")

    # -- what the server adds and allows -----------------------------------------------------------
    defaults: ClassVar[dict[str, Callable[[], Any]]] = {}  # containers a new record gets when missing
    has_locations: ClassVar[bool] = False  # 'locations': platform -> {"path": ...}
    delete_role: ClassVar[str] = "admin"   # the role a DELETE needs

    # -- lineage -----------------------------------------------------------------------------------
    column: ClassVar[int] = 4            # its column in the lineage picture, upstream (0) to downstream
    colour: ClassVar[str] = "#e5e7eb"

    # -- pages -------------------------------------------------------------------------------------
    page: ClassVar[str] = "entry.html"           # the template of one entry
    list_page: ClassVar[str | None] = None       # the template of its table (default: entries.html,
    #                                              or table.html with a summary ``table``)
    list_headers: ClassVar[tuple[str, ...]] = ("Key", "Updated")
    lineage_on_page: ClassVar[bool] = True
    # a sortable summary table in the index (column -> SQL type), for a list page sorted by content;
    # without one, its table sorts by key and stamps only
    table: ClassVar[dict[str, str]] = {}
    table_headers: ClassVar[tuple[tuple[str, str], ...]] = ()  # (column, header) of that list page, key first

    # -- records -----------------------------------------------------------------------------------
    def add_defaults(self, record: dict) -> dict:
        for field, factory in self.defaults.items():
            if field not in record or record[field] is None:
                record[field] = factory()
        return record

    def new_record(self, body: Any, key_from_url: str | None = None) -> tuple[str, dict]:
        """The key and record for a POST (``key_from_url`` None) or a PUT, with the server's defaults."""
        record = strip_hidden(require_object(body))
        main = self.main_key
        if key_from_url is not None:
            if main in record and record[main] != key_from_url:
                raise BadRequest(f"the body's {main} '{str(record[main])[:80]}' differs from the URL's '{key_from_url}'")
            record[main] = key_from_url
        if main not in record:
            raise BadRequest(f"a {self.name} entry needs a '{main}' field: its key")
        key = check_key(record[main], f"{self.name} {main}")
        return key, self.add_defaults(record)

    def validate(self, key: str, record: Any, old: dict | None, *, settings: Settings | None = None,
                 creating: bool = False) -> dict:
        """Raise a 4xx unless ``record`` may be stored as entry ``key``; ``old`` is the current record."""
        record = require_object(record, f"the {self.name} entry")
        if record.get(self.main_key) != key:
            raise BadRequest(f"the field '{self.main_key}' is the entry's key '{key}' and cannot be changed or removed")
        if any(isinstance(k, str) and k.startswith("_") for k in record):
            raise BadRequest("top-level fields starting with '_' belong to the server and cannot be written")
        self.check(key, record, old, settings=settings or Settings(), creating=creating)
        if self.has_locations and "locations" in record:
            locations = record["locations"]
            if not isinstance(locations, dict):
                raise BadRequest("'locations' must be an object of platform -> {\"path\": ...}")
            for platform, where in locations.items():
                check_platform(platform)
                if not isinstance(where, dict) or not isinstance(where.get("path"), (str, type(None))):
                    raise BadRequest(f"location '{platform}' must be an object with a 'path' string")
        if "protected" in record and not isinstance(record["protected"], bool):
            raise BadRequest("'protected' must be true or false")
        return record

    def check(self, key: str, record: dict, old: dict | None, *, settings: Settings, creating: bool) -> None:
        """This collection's own rules for a record about to be stored (raise a 4xx)."""

    def updating(self, old: dict, new: dict) -> None:
        """Adjust a changed record before it is validated (e.g. move a heartbeat stamp)."""

    def before_create(self, record: dict, index: IndexView) -> None:
        """Refuse a new entry that would break another (raise a 4xx)."""

    def before_delete(self, key: str, record: dict) -> None:
        """Refuse deleting an entry (raise a 4xx), e.g. while it still names copies of data."""

    # -- lineage -----------------------------------------------------------------------------------
    def edges(self, key: str, record: dict) -> list[tuple[str, str, str]]:
        """(upstream reference, relation, downstream reference) that this entry declares."""
        return []

    def run_ids(self, record: dict) -> list[str]:
        """The training runs this entry *is* (only trainings are identified by their run_id)."""
        return []

    def refs(self, key: str, record: dict) -> list[str]:
        """Every reference that designates this entry (see :mod:`maelflow_registry.refs`)."""
        return [ref(self.name, key)] + [run_ref(r) for r in self.run_ids(record)]

    def label(self, key: str, record: dict) -> str:
        """Its name in the lineage picture."""
        return key

    # -- pages -------------------------------------------------------------------------------------
    def link(self, key: str) -> str:
        return f"/{self.name}/{urllib.parse.quote(key)}"

    def page_title(self, key: str) -> str:
        return f"{self.singular} {key}"

    def list_row(self, row: dict, index: IndexView) -> list[Cell]:
        """The cells of one entry in its web table (``row``: key, created, updated, record)."""
        return [(row["key"], self.link(row["key"])), (row["updated"][:19], None)]

    def page_context(self, key: str, record: dict, index: IndexView) -> dict:
        """What its entry page shows besides the record, the stamps and the lineage."""
        return {}

    def table_row(self, record: dict, created: str) -> dict:
        """The summary table's columns for one record (only with ``table``)."""
        return {}
