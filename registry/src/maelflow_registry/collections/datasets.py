"""Datasets: anemoi-datasets zarrs, by name, with their copies (``locations``) and zarr metadata.

The anemoi-registry client registers ``{name, metadata}`` read from the zarr and then adds copies
with JSON-patch ``add /locations/<platform>``, so a new dataset gets an empty ``locations`` object.
New names follow anemoi-datasets' naming convention unless the server's ``dataset_naming`` setting
is ``relaxed``. A dataset that still lists copies cannot be deleted: its entry is how the last copy
is found. Its table is sorted by content (size, shape, dates), so the index keeps a summary row.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from maelflow_registry.collections.base import Collection
from maelflow_registry.config import Settings
from maelflow_registry.errors import BadRequest, Conflict
from maelflow_registry.refs import Edges, dataset_name, metadata, ref

COLLECTION = "datasets"

# anemoi-datasets' naming convention (anemoi/datasets/create/naming.py), copied rather than imported:
# importing anemoi-datasets costs the server a second and several hundred MB
_GRIDDED = r"^(\w+)-([\w-]+)-(\w+)-([0-9ron]\w*)-(\d\d\d\d)-(\d\d\d\d)-(\d+h|\d+m)-v(\d+)-?([a-zA-Z0-9-]+)?$"
_TRAJECTORIES = (r"^(\w+)-([\w-]+)-(\w+)-([0-9ron]\w*)-(\d\d\d\d)-(\d\d\d\d)-(\d+h|\d+m)-(\d+h|\d+m)-v(\d+)"
                 r"-?([a-zA-Z0-9-]+)?$")
_TABULAR = r"^(\w+)-([\w-]+)-(\w+)(?:-([0-9ron]\w*))?-(\d\d\d\d)-(\d\d\d\d)-v(\d+)-?([a-zA-Z0-9-]+)?$"
ANEMOI_NAME_PATTERNS = [re.compile(p) for p in (_GRIDDED, _TRAJECTORIES, _TABULAR)]
ANEMOI_NAME_EXAMPLE = "aifs-ea-an-oper-0001-mars-o96-1979-2022-6h-v6"


def name_problems(name: str, policy: str) -> list[str]:
    """Why ``name`` breaks the dataset naming policy ('anemoi' or 'relaxed'); empty when it is fine."""
    problems: list[str] = []
    if policy == "relaxed":
        return problems
    if name != name.lower():
        problems.append("it should be in lower case")
    if "_" in name:
        problems.append("it should use '-' instead of '_'")
    if any(not (c.isalnum() or c == "-") for c in name):
        problems.append("it should contain only letters, digits and '-'")
    if not any(p.match(name) for p in ANEMOI_NAME_PATTERNS):
        problems.append("it does not follow purpose-labelling-source-resolution-start-end-frequency-vN[-extra], "
                        f"e.g. '{ANEMOI_NAME_EXAMPLE}'")
    return problems


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Datasets(Collection):
    name = COLLECTION
    main_key = "name"
    title, singular = "Datasets", "Dataset"
    defaults = {"locations": dict}
    has_locations = True
    column, colour = 0, "#dbeafe"
    page, list_page = "dataset.html", "datasets.html"
    table = {"size": "INTEGER", "files": "INTEGER", "resolution": "TEXT", "frequency": "TEXT", "rows": "INTEGER",
             "variables": "INTEGER", "ensembles": "INTEGER", "grid_values": "INTEGER", "created": "TEXT",
             "locations": "TEXT", "status": "TEXT"}
    table_headers = (("name", "Name"), ("size", "Size"), ("files", "Files"), ("resolution", "Resolution"),
                     ("frequency", "Frequency"), ("rows", "Rows"), ("variables", "Variables"),
                     ("ensembles", "Ensemble members"), ("grid_values", "Values"), ("created", "Created"),
                     ("locations", "Locations"), ("usage", "Usage"))

    def check(self, key: str, record: dict, old: dict | None, *, settings: Settings, creating: bool) -> None:
        if creating:
            problems = name_problems(key, settings.dataset_naming)
            if problems:
                raise BadRequest(f"bad dataset name '{key}': " + "; ".join(problems),
                                 hint="the server's dataset_naming setting is 'anemoi'; an admin may set 'relaxed'")

    def before_delete(self, key: str, record: dict) -> None:
        locations = record.get("locations") if isinstance(record.get("locations"), dict) else {}
        if locations:
            raise Conflict(f"dataset '{key}' still lists {len(locations)} cop{'y' if len(locations) == 1 else 'ies'} "
                           f"({', '.join(sorted(locations))}): deleting its entry would lose track of the last "
                           "copy; remove (or delete) its locations first")

    def edges(self, key: str, record: dict) -> list[tuple[str, str, str]]:
        me, out = ref(self.name, key), Edges()
        for fieldname in ("derived_from", "parents"):
            for value in (record.get(fieldname), metadata(record).get(fieldname)):
                for item in (value if isinstance(value, list) else [value]):
                    name = dataset_name(item)
                    if name:
                        out.add(ref(self.name, name), "derived-into", me)
        return list(out)

    def page_title(self, key: str) -> str:
        return key

    def table_row(self, record: dict, created: str) -> dict:
        """The table's columns, taken from the anemoi zarr metadata the client registers."""
        md = metadata(record)
        shape = md.get("shape") if isinstance(md.get("shape"), list) else []
        shape = [s if _int(s) is not None else None for s in shape] + [None] * 4
        variables = md.get("variables")
        locations = record.get("locations") if isinstance(record.get("locations"), dict) else {}
        written = md.get("latest_write_timestamp") or md.get("created")
        return {
            "size": _int(md.get("total_size")),
            "files": _int(md.get("total_number_of_files")),
            "resolution": None if md.get("resolution") is None else str(md.get("resolution")),
            "frequency": None if md.get("frequency") is None else str(md.get("frequency")),
            "rows": shape[0],
            "variables": len(variables) if isinstance(variables, list) else shape[1],
            "ensembles": shape[2],
            "grid_values": shape[3],
            "created": (str(written) if isinstance(written, str) else created)[:19].replace("T", " "),
            "locations": ",".join(sorted(locations)),
            "status": record.get("status") if isinstance(record.get("status"), str) else None,
        }

    def page_context(self, key: str, record: dict, index: Any) -> dict:
        """Overview, recipe, variables with their statistics, and copies."""
        md = metadata(record)
        variables = md.get("variables") if isinstance(md.get("variables"), list) else []
        stats = md.get("statistics") if isinstance(md.get("statistics"), dict) else {}
        vmeta = md.get("variables_metadata") if isinstance(md.get("variables_metadata"), dict) else {}
        rows = []
        for i, name in enumerate(variables):
            row = {"name": name, "meta": vmeta.get(name) if isinstance(vmeta.get(name), dict) else {}}
            for stat in ("mean", "stdev", "minimum", "maximum"):
                values = stats.get(stat)
                row[stat] = values[i] if isinstance(values, list) and i < len(values) else None
            rows.append(row)
        recipe = md.get("recipe")
        overview = [(label, md.get(field)) for label, field in (
            ("uuid", "uuid"), ("start date", "start_date"), ("end date", "end_date"), ("frequency", "frequency"),
            ("resolution", "resolution"), ("shape", "shape"), ("dtype", "dtype"), ("chunks", "chunks"),
            ("licence", "licence"), ("attribution", "attribution"), ("total size", "total_size"),
            ("files", "total_number_of_files"), ("anemoi-datasets format", "version")) if md.get(field) is not None]
        return {"name": key, "locations": record.get("locations") or {}, "variables": rows, "overview": overview,
                "recipe": yaml.safe_dump(recipe, sort_keys=False) if recipe else None,
                "has_stats": any(stats.get(s) for s in ("mean", "stdev", "minimum", "maximum"))}


collection = Datasets()
