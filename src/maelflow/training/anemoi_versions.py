"""Which anemoi-training line a site runs, and which configuration keys that line has.

Why: anemoi-training's configuration schema changes between releases (0.17 moved ``training.lr``
to ``training.optimization``, ``training.multistep_input`` and ``rollout`` to ``task``, ...), so a
training config written for one release does not compose, or fails anemoi's own validation, on
another - on the HPC, after the queue wait. maelflow supports two lines:

- ``0.10``: anemoi-training 0.10.x (anemoi-models 0.13, anemoi-graphs 0.9.0), what pip resolves beside
  the CPU torch 2.13 of these machines; the main environment.
- ``0.17``: the current line, anemoi-training 0.17.x (models 0.19, graphs 0.9.8), tested in CI in its
  own environment (``.venv-anemoi17``); later releases are taken as this line until one changes the
  schema again.

Each line has its own base configuration (``anemoi_configs/<line>/maelflow-base.yaml``) chosen at
launch by the installed version, and a description of its configuration keys
(``anemoi_configs/<line>/schema.json``, made by ``python -m maelflow.training.anemoi_versions`` in an
environment with that line installed) that ``maelflow validate`` checks a training's ``config`` and
``overrides`` against, for the version of each site the training runs on: the site profile's
``anemoi_version``, else, for a site on this machine, the installed package.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from maelflow.errors import ConfigurationError

CONFIGS = Path(__file__).resolve().parent / "anemoi_configs"
BASE_CONFIG_NAME = "maelflow-base"
SCHEMA_FILE = "schema.json"
VERSION_RE = re.compile(r"^\d+\.\d+(?:\.\d+)?(?:[.+-]?[A-Za-z0-9.+-]*)?$")

# Keys under these names are names the user chooses (datasets, graph node sets, processors, the
# normaliser's methods...), not schema keys: below them any key is accepted.
OPEN_KEYS = frozenset({"datasets", "nodes", "processors", "config", "scalers", "callbacks", "variable_groups",
                       "attributes", "metrics", "validation_metrics", "edges", "kwargs", "plot_fn"})

# Known moves between the lines, for the hint of a key the site's line does not have.
MOVED = {
    ("0.10", "0.17"): {"training.lr": "training.optimization.lr (a number) and training.optimization.lr_scheduler "
                                      "(warmup_t, t_initial)",
                       "training.multistep_input": "task.multistep_input", "training.rollout": "task.rollout",
                       "data.timestep": "task.timestep", "training.optimizer": "training.optimization.optimizer"},
}
MOVED[("0.17", "0.10")] = {
    "training.optimization": "training.lr (rate, warmup, iterations) and training.optimizer",
    "task": "training.multistep_input, training.rollout and data.timestep",
}


class AnemoiVersionError(ConfigurationError):
    """An anemoi-training version maelflow has no configuration for, or none installed."""


@dataclass(frozen=True)
class Line:
    """A run of anemoi-training releases that share one configuration schema."""

    name: str                       # "0.10"
    first: tuple[int, int]          # lowest (major, minor) of the line
    last: tuple[int, int] | None    # highest (major, minor), None: every later release too
    tested: str                     # the release CI runs it with

    @property
    def config_dir(self) -> Path:
        return CONFIGS / self.name

    def holds(self, version: tuple[int, ...]) -> bool:
        minor = tuple(version[:2])
        return minor >= self.first and (self.last is None or minor <= self.last)

    def schema(self) -> "Schema":
        return _schema(self.name)


LINES = (Line("0.10", (0, 10), (0, 10), "0.10.0"), Line("0.17", (0, 17), None, "0.17.1"))


def parse(version: str) -> tuple[int, ...]:
    """``"0.17.1"`` -> (0, 17, 1); a trailing pre/post/local part is ignored."""
    parts = []
    for piece in str(version).strip().split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
        if digits.group() != piece:
            break
    if len(parts) < 2:
        raise AnemoiVersionError(f"{version!r} is not an anemoi-training version (such as 0.17.1)")
    return tuple(parts)


def line_for(version: str) -> Line:
    """The line of a release; releases between the lines (0.11 to 0.16) have none."""
    parsed = parse(version)
    for line in LINES:
        if line.holds(parsed):
            return line
    raise AnemoiVersionError(
        f"anemoi-training {version} is not supported by maelflow",
        hint="supported: " + supported_text() + "; pin the site to one of them (docs/training.md)")


def supported_text() -> str:
    return ", ".join(f"{ln.name}.x" if ln.last else f"{ln.name} and later" for ln in LINES)


def installed_version() -> str | None:
    """anemoi-training's version in this Python environment, None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("anemoi-training")
    except metadata.PackageNotFoundError:
        return None


def installed_line() -> Line:
    version = installed_version()
    if version is None:
        raise AnemoiVersionError("anemoi-training is not installed in this Python environment",
                                 hint="install maelflow with its [anemoi] extra (scripts/install.sh)")
    return line_for(version)


def site_version(site) -> tuple[str | None, str]:
    """The anemoi-training version a site runs, and where that was learnt: the site profile's
    ``anemoi_version`` first (what an operator pins, or what ``maelflow site check`` found), else the
    package installed here when the site is this machine; ``(None, why)`` when neither says."""
    pinned = getattr(site, "anemoi_version", None)
    if pinned:
        return str(pinned), "site profile"
    if site.connection.type == "local":
        version = installed_version()
        if version:
            return version, "installed here"
        return None, "anemoi-training is not installed here"
    return None, "set anemoi_version in the site profile"


# ------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Schema:
    """The configuration keys of one line: a tree of mappings (leaves are None) and the options of
    every config group (``model: [gnn, graphtransformer, ...]``)."""

    line: str
    version: str
    tree: dict
    groups: dict[str, list[str]]

    def unknown(self, path: list[str]) -> int | None:
        """Index of the first part of ``path`` this line does not have, None when it has them all.

        Below a leaf (a value, null or a list: a config may put a mapping there), below a mapping
        with ``_target_`` (keyword arguments of a class) and below user-named keys (``OPEN_KEYS``)
        any key is accepted."""
        node: Any = self.tree
        for i, part in enumerate(path):
            if not isinstance(node, dict) or "_target_" in node:
                return None
            if i and path[i - 1] in OPEN_KEYS:
                return None
            if part not in node:
                return i
            node = node[part]
        return None

    def has(self, dotted: str) -> bool:
        return self.unknown(dotted.split(".")) is None


@lru_cache(maxsize=None)
def _schema(line: str) -> Schema:
    data = json.loads((CONFIGS / line / SCHEMA_FILE).read_text())
    return Schema(line=line, version=data["version"], tree=data["tree"], groups=data["groups"])


def _merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        key = str(key)
        if isinstance(value, dict):
            if not isinstance(into.get(key), dict):
                into[key] = {}
            _merge(into[key], value)
        else:
            into.setdefault(key, None)


def _package_of(text: str, group: str) -> str:
    match = re.search(r"^#\s*@package\s+(\S+)", text, re.M)
    package = match.group(1) if match else "_group_"
    package = package.replace("_group_", group.replace("/", ".")).replace("_global_", "")
    return package.strip(".")


def describe_installed() -> dict:
    """The key tree and group options of the installed anemoi-training: every YAML file of its
    packaged configs merged at its package (all options of a group together, so that a key any
    option has is known), then maelflow's base config of the line over it."""
    import importlib.resources

    import yaml

    version = installed_version()
    if version is None:
        raise AnemoiVersionError("anemoi-training is not installed in this Python environment")
    line = line_for(version)
    root = importlib.resources.files("anemoi.training") / "config"
    tree: dict = {}
    groups: dict[str, set[str]] = {}

    def walk(folder, rel: str) -> Iterator[tuple[str, Any]]:
        for entry in folder.iterdir():
            name = entry.name
            if entry.is_dir():
                if not name.startswith(("_", ".")):
                    yield from walk(entry, f"{rel}/{name}" if rel else name)
            elif name.endswith((".yaml", ".yml")):
                yield rel, entry

    for group, entry in walk(root, ""):
        text = entry.read_text()
        option = entry.name.rsplit(".", 1)[0]
        if group:
            groups.setdefault(group, set()).add(option)
        package = _package_of(text, group)
        for doc in yaml.safe_load_all(text):
            if not isinstance(doc, dict):
                continue
            doc = {k: v for k, v in doc.items() if k != "defaults"}
            node = tree
            for part in filter(None, package.split(".")):
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            _merge(node, doc)
    base = yaml.safe_load((line.config_dir / f"{BASE_CONFIG_NAME}.yaml").read_text())
    _merge(tree, {k: v for k, v in base.items() if k != "defaults"})
    # what maelflow itself sets at launch (anemoi_app.train_anemoi) is part of every line
    for dotted in launch_keys():
        nested: dict = {}
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = None
        _merge(tree, nested)
    return {"line": line.name, "version": version, "tree": tree,
            "groups": {g: sorted(opts) for g, opts in sorted(groups.items())}}


def launch_keys() -> tuple[str, ...]:
    """The keys maelflow sets in every anemoi config it launches (both lines have them)."""
    return ("system.input.dataset", "system.input.graph", "system.input.warm_start", "system.output.root",
            "system.output.logs.mlflow", "system.hardware.accelerator", "system.hardware.num_gpus_per_node",
            "system.hardware.num_nodes", "diagnostics.log.mlflow.enabled", "diagnostics.log.mlflow.offline",
            "diagnostics.log.mlflow.tracking_uri", "diagnostics.log.mlflow.save_dir",
            "diagnostics.log.mlflow.experiment_name", "diagnostics.log.mlflow.run_name",
            "training.run_id", "training.fork_run_id", "training.precision")


# ---------------------------------------------------------------------------------- training check
def _flatten(mapping: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in mapping.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and value:
            yield from _flatten(value, path)
        else:
            yield path


OVERRIDE_RE = re.compile(r"^(?P<op>~|\+\+|\+)?(?P<key>[A-Za-z_][\w./@-]*)(?:=(?P<value>.*))?$", re.S)


def training_problems(training, line: Line) -> list[tuple[str, object, str]]:
    """``(field, value, reason)`` for every key of a training's ``config`` and ``overrides`` that
    ``line`` does not have; empty when they all exist there. A ``~key`` override (a deletion) is not
    checked, and a ``+``/``++`` override may add one new key to a mapping the line has."""
    schema = line.schema()
    problems: list[tuple[str, object, str]] = []

    def reason(dotted: str, first_unknown: str) -> str:
        text = f"{line.name} line (schema of {schema.version}) has no key {first_unknown!r}"
        for (_, new), moves in MOVED.items():
            if new != line.name:
                continue
            for moved, where in moves.items():
                if dotted == moved or dotted.startswith(moved + "."):
                    return f"{text}; in {new} this is {where}"
        other = [ln.name for ln in LINES if ln.name != line.name and _has_schema(ln) and ln.schema().has(dotted)]
        if other:
            text += f" (it is a key of the {', '.join(other)} line)"
        return text

    for path in _flatten({k: v for k, v in dict(training.config).items() if k not in ("defaults", "hydra")}):
        index = schema.unknown(list(path))
        if index is not None:
            dotted = ".".join(path)
            value = training.config
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            problems.append((f"config.{dotted}", value, reason(dotted, ".".join(path[:index + 1]))))
    for i, text in enumerate(training.overrides):
        match = OVERRIDE_RE.match(text.strip())
        if not match or match.group("op") == "~":
            continue
        key = match.group("key").split("@", 1)[0]
        groups = {g for ln in LINES if _has_schema(ln) for g in ln.schema().groups}
        if "/" in key or (match.group("value") is not None and key in groups and "." not in key):
            group = key
            option = (match.group("value") or "").strip()
            if group not in schema.groups:
                why = f"{line.name} line has no config group {group!r}"
                moved = MOVED.get((_other(line), line.name), {}).get(group.replace("/", "."))
                problems.append((f"overrides[{i}]", text, why + (f"; in {line.name} this is {moved}" if moved else "")))
            elif option and option not in ("null", "None") and option not in schema.groups[group] \
                    and not option.startswith("["):
                problems.append((f"overrides[{i}]", text,
                                 f"{line.name} line has no {group!r} option {option!r} "
                                 f"(it has: {', '.join(schema.groups[group])})"))
            continue
        parts = key.split(".")
        index = schema.unknown(parts)
        if index is not None and not (match.group("op") and index == len(parts) - 1):
            # (`+a.b.new=1` adds a key of its own to a mapping this line has: Hydra's way to say so)
            problems.append((f"overrides[{i}]", text, reason(key, ".".join(parts[:index + 1]))))
    return problems


def _other(line: Line) -> str:
    return next(ln.name for ln in LINES if ln is not line)


def _has_schema(line: Line) -> bool:
    return (line.config_dir / SCHEMA_FILE).exists()


def check_training(tfile: str, tname: str, training, sites: dict) -> list:
    """``ConfigProblem``s of an anemoi training against the anemoi version of each site it runs on."""
    from maelflow.config.errors import ConfigProblem

    problems = []
    done: set[str] = set()
    for sname, site in sites.items():
        version, source = site_version(site)
        if version is None:
            continue
        try:
            line = line_for(version)
        except AnemoiVersionError as exc:
            field = "anemoi_version" if source == "site profile" else "application"
            problems.append(ConfigProblem(tfile, field, version, f"site {sname!r} ({source}): {exc}"))
            continue
        for field, value, why in training_problems(training, line):
            key = (line.name, field)
            if key in done:
                continue
            done.add(key)
            problems.append(ConfigProblem(tfile, field, value, f"site {sname!r} runs anemoi-training {version} "
                                          f"({source}), whose {why}"))
    return problems


def line_name(version: str | None) -> str | None:
    """The supported line a version belongs to (``0.10``, ``0.17``), None when unknown or unsupported."""
    if not version:
        return None
    try:
        return line_for(version).name
    except AnemoiVersionError:
        return None


def versions_report(sites: dict) -> dict[str, dict[str, str | None]]:
    """Per site: the anemoi-training version, its line and where it was learnt (for validate's report)."""
    out: dict[str, dict[str, str | None]] = {}
    for sname, site in sites.items():
        version, source = site_version(site)
        out[sname] = {"version": version, "line": line_name(version), "source": source}
    return out


# --------------------------------------------------------------------------------- checkpoints
def checkpoint_metadata(path: str | Path) -> dict | None:
    """The anemoi metadata (``anemoi.json``) inside a checkpoint of either line, read from the zip
    without unpickling anything; None when the file has none."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("anemoi-metadata/anemoi.json") or n.endswith("/anemoi.json")]
            if not names:
                return None
            with zf.open(sorted(names, key=len)[0]) as fh:
                return json.load(fh)
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


def metadata_version(metadata: dict | None) -> str | None:
    """The anemoi-training version that wrote a checkpoint, from its metadata's provenance."""
    if not metadata:
        return None
    versions = (metadata.get("provenance_training") or {}).get("module_versions") or {}
    for key in ("anemoi.training", "anemoi-training", "anemoi_training"):
        value = versions.get(key)
        if isinstance(value, dict):  # {"version": "0.17.1"} (and git details for a checkout)
            value = value.get("version")
        if value:
            return str(value)
    return None


def checkpoint_summary(path: str | Path) -> dict[str, Any] | None:
    """What lineage needs of an anemoi checkpoint, the same fields from a 0.10 or a 0.17 one: its
    uuid, parent, run, the anemoi version and line, global step and dataset paths."""
    meta = checkpoint_metadata(path)
    if meta is None:
        return None
    version = metadata_version(meta)
    line = line_name(version)
    dataset = meta.get("dataset") or {}
    paths: list[str] = []

    def collect(node: Any, under_dataset: bool = False) -> None:  # open_dataset's arguments, any nesting
        if isinstance(node, str) and under_dataset and node not in paths:
            paths.append(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                collect(value, key == "dataset")
        elif isinstance(node, list):
            for value in node:
                collect(value, under_dataset)

    for entry in (dataset.values() if "arguments" not in dataset else [dataset]):  # keyed by dataset name
        if isinstance(entry, dict):
            collect({"dataset": (entry.get("arguments") or {}).get("args") or []})
            collect((entry.get("arguments") or {}).get("kwargs") or {})
    training = meta.get("training") or {}
    tracker = (meta.get("tracker") or {}).get("mlflow") or {}
    return {"uuid": meta.get("uuid"), "parent_uuid": meta.get("parent_uuid"), "run_id": meta.get("run_id"),
            "anemoi_version": version, "anemoi_line": line, "global_step": training.get("global_step"),
            "mlflow_run_id": tracker.get("id"), "task": (meta.get("metadata_inference") or {}).get("task"),
            "datasets": paths}


def main() -> None:  # pragma: no cover - run by a developer to refresh a line's schema.json
    """Write ``anemoi_configs/<line>/schema.json`` for the anemoi-training installed here."""
    data = describe_installed()
    target = CONFIGS / data["line"] / SCHEMA_FILE
    target.write_text(json.dumps({"version": data["version"], "tree": data["tree"], "groups": data["groups"]},
                                 indent=1, sort_keys=True) + "\n")
    print(f"wrote {target} (anemoi-training {data['version']})")


if __name__ == "__main__":  # pragma: no cover
    main()
