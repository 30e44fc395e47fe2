"""Models: maelflow's own collection. A model is a promoted checkpoint, in numbered versions with aliases.

A version (``versions["3"] = {"weights": <uuid>, "promoted", "promoted_by"}``) never changes once
written; an alias (``candidate``, ``operational``) moves between versions. Promoting and moving an
alias are the two changes a model gets (:func:`promote`, :func:`set_alias`, behind the models
routes). Edge: checkpoint -promoted-vN-> model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from maelflow_registry.collections.base import Cell, Collection
from maelflow_registry.config import Settings
from maelflow_registry.errors import BadRequest, Conflict, Unprocessable
from maelflow_registry.keys import check_key
from maelflow_registry.records import now_iso
from maelflow_registry.refs import Edges, first_key, ref

if TYPE_CHECKING:
    from maelflow_registry.catalogue import Catalogue

COLLECTION = "models"


class Models(Collection):
    name = COLLECTION
    main_key = "name"
    title, singular = "Models", "Model"
    defaults = {"versions": dict, "aliases": dict}
    column, colour = 3, "#fae8ff"
    page = "model.html"
    list_headers = ("Name", "Versions", "Aliases", "Latest", "Updated")

    def check(self, key: str, record: dict, old: dict | None, *, settings: Settings, creating: bool) -> None:
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

    def edges(self, key: str, record: dict) -> list[tuple[str, str, str]]:
        out = Edges()
        versions = record.get("versions") if isinstance(record.get("versions"), dict) else {}
        for number, version in versions.items():
            uuid = first_key(version.get("weights")) if isinstance(version, dict) else None
            if uuid:
                out.add(ref("weights", uuid), f"promoted-v{number}", ref(self.name, key))
        return list(out)

    def label(self, key: str, record: dict) -> str:
        aliases = record.get("aliases") if isinstance(record.get("aliases"), dict) else {}
        if aliases:
            return f"{key} [{', '.join(f'{a}=v{v}' for a, v in sorted(aliases.items()))}]"
        return key

    def list_row(self, row: dict, index: Any) -> list[Cell]:
        rec, key = row["record"], row["key"]
        versions = rec.get("versions") or {}
        latest = max(versions, key=lambda n: int(n) if str(n).isdigit() else 0) if versions else None
        aliases = ", ".join(f"{a} → v{v}" for a, v in sorted((rec.get("aliases") or {}).items()))
        return [(key, self.link(key)), (len(versions), None), (aliases, None),
                (f"v{latest}: {versions[latest].get('weights')}" if latest else "", None),
                (row["updated"][:19], None)]


collection = Models()


def promote(catalogue: "Catalogue", name: str, weights: str, *, user: str, role: str | None,
            description: str | None = None, alias: str | None = None) -> tuple[dict, int]:
    """A new immutable version of model ``name`` made from the registered checkpoint ``weights``."""
    check_key(name, "model name")
    check_key(weights, "checkpoint uuid")
    if catalogue.index.get("weights", weights) is None:
        raise Unprocessable(f"checkpoint '{weights}' is not registered: register it (weights) before "
                            "promoting it to a model")

    def mutate(old: dict | None) -> dict:
        model = old or collection.add_defaults({"name": name})
        numbers = [int(n) for n in model["versions"] if str(n).isdigit()]
        number = max(numbers, default=0) + 1
        version = {"weights": weights, "promoted": now_iso(), "promoted_by": user}
        if description:
            version["description"] = description
        model["versions"][str(number)] = version
        if alias:
            model["aliases"][alias] = number
        return model

    new, version, _ = catalogue.write(COLLECTION, name, mutate, user=user, role=role)
    return new, version


def set_alias(catalogue: "Catalogue", name: str, alias: str, number: Any, *, user: str,
              role: str | None) -> tuple[dict, int]:
    """Point ``alias`` of model ``name`` at an existing version."""
    check_key(name, "model name")
    try:
        number = int(number)
    except (TypeError, ValueError):
        raise BadRequest("the body must be {\"version\": <number>}") from None

    def mutate(old: dict | None) -> dict:
        old["aliases"][alias] = number
        return old

    new, version, _ = catalogue.write(COLLECTION, name, mutate, user=user, role=role, must_exist=True)
    return new, version
