"""Compose an experiment with Hydra, resolve the sites/datasets/trainings it names, validate all.

An experiment file names its parts; each part lives in its own file under the config root
(``sites/``, ``datasets/``, ``trainings/``), so switching ``sites=[lumi,leonardo]`` on the command
line changes where it runs without touching anything else. Overrides ``key=value`` go to the
experiment through Hydra; ``site.NAME.key=value``, ``dataset.NAME.key=value`` and
``training.NAME.key=value`` reach one part. Every problem is collected before anything is reported,
so a user fixes a config in one pass.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from maelflow.config.errors import ConfigError, ConfigProblem, problems_from_validation
from maelflow.config.models import Dataset, Experiment, Site, Training

PART_KINDS = {"site": ("sites", Site), "dataset": ("datasets", Dataset), "training": ("trainings", Training)}
CONFIG_DIR_ENV = "MAELFLOW_CONFIG_DIR"


@dataclass(frozen=True)
class ResolvedExperiment:
    """An experiment with every part it names, validated together."""

    experiment: Experiment
    sites: dict[str, Site]
    datasets: dict[str, Dataset]
    trainings: dict[str, Training]
    source_file: str
    overrides: tuple[str, ...] = ()
    config_root: str = ""
    placeholders: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.experiment.name

    def to_json(self) -> dict[str, Any]:
        """The resolved configuration, as a job or a provenance record sees it."""
        return {
            "experiment": self.experiment.model_dump(mode="json"),
            "sites": {k: v.model_dump(mode="json") for k, v in self.sites.items()},
            "datasets": {k: v.model_dump(mode="json") for k, v in self.datasets.items()},
            "trainings": {k: v.model_dump(mode="json") for k, v in self.trainings.items()},
            "source": {"file": self.source_file, "overrides": list(self.overrides)},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ResolvedExperiment":
        return cls(
            experiment=Experiment.model_validate(data["experiment"]),
            sites={k: Site.model_validate(v) for k, v in data["sites"].items()},
            datasets={k: Dataset.model_validate(v) for k, v in data["datasets"].items()},
            trainings={k: Training.model_validate(v) for k, v in data["trainings"].items()},
            source_file=data.get("source", {}).get("file", ""),
            overrides=tuple(data.get("source", {}).get("overrides", [])))


def default_config_root() -> Path:
    """$MAELFLOW_CONFIG_DIR, else ./configs, else the configs/ of the source checkout."""
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env).resolve()
    here = Path.cwd() / "configs"
    if (here / "experiments").is_dir():
        return here.resolve()
    return (Path(__file__).resolve().parents[3] / "configs").resolve()


def locate_experiment(ref: str, config_root: Path | None = None) -> tuple[Path, Path]:
    """(experiment file, config root) for a name under experiments/ or a path to a YAML file."""
    if ref.endswith((".yaml", ".yml")) or os.sep in ref:
        path = Path(ref).expanduser().resolve()
        if not path.is_file():
            raise ConfigError([ConfigProblem(ref, "", ref, "no such experiment file")])
        if config_root is None:
            config_root = path.parent.parent if path.parent.name == "experiments" else default_config_root()
        return path, config_root.resolve()
    root = (config_root or default_config_root()).resolve()
    path = root / "experiments" / f"{ref}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / "experiments").glob("*.yaml"))
        raise ConfigError([ConfigProblem(str(path), "", ref,
                                         f"no experiment named {ref!r}; known: {', '.join(known) or 'none'}")])
    return path, root


def split_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[list[str], dict[tuple[str, str], list[str]], list[ConfigProblem]]:
    """Experiment overrides for Hydra, and part overrides keyed by (kind, name)."""
    exp: list[str] = []
    parts: dict[tuple[str, str], list[str]] = {}
    problems = []
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        head = key.split(".", 1)[0]
        if head in PART_KINDS:
            bits = key.split(".", 2)
            if "=" not in ov or len(bits) < 3:
                problems.append(ConfigProblem("<command line>", key, ov,
                                              f"write {head}.NAME.field=value to override one {head}"))
                continue
            parts.setdefault((head, bits[1]), []).append(f"{bits[2]}={ov.split('=', 1)[1]}")
        else:
            exp.append(ov)
    return exp, parts, problems


def compose_file(path: Path, overrides: list[str]) -> dict[str, Any]:
    """Compose one YAML file with Hydra's semantics (defaults lists, interpolation, overrides).

    A file without a ``defaults`` list needs none of Hydra's config search: it is loaded with
    OmegaConf and the overrides are parsed and applied by Hydra's own override parser, which gives
    the same result as ``hydra.compose`` about 30 times faster (building 100 suites is a benchmark).
    Files with a ``defaults`` list go through the full ``hydra.compose``.
    """
    from omegaconf import DictConfig, OmegaConf

    path = path.resolve()
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path} must hold a mapping, not a {type(cfg).__name__}")
    if "defaults" in cfg:
        return _hydra_compose(path, overrides)
    if overrides:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        OmegaConf.set_struct(cfg, True)
        for text in overrides:
            key, _, value = text.partition("=")
            try:
                ConfigLoaderImpl._apply_overrides_to_config(parser.parse_overrides([text]), cfg)
            except Exception as exc:  # noqa: BLE001 - Hydra/OmegaConf errors, reported per override
                reason = _first_line(exc)
                if "not in struct" in str(exc) or "Could not override" in reason:
                    reason = f"no such field to override; write +{key.lstrip('+')}=... to add one"
                raise OverrideError(key.lstrip("+~"), value, reason) from None
        OmegaConf.set_struct(cfg, False)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


class OverrideError(ValueError):
    def __init__(self, key: str, value: str, reason: str):
        super().__init__(reason)
        self.key, self.value, self.reason = key, value, reason


def _first_line(exc: BaseException) -> str:
    while not str(exc).strip() and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _hydra_compose(path: Path, overrides: list[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(path.parent), version_base=None):
        cfg = compose(config_name=path.stem, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


@lru_cache(maxsize=512)
def _load_part_cached(path: str, mtime: float, overrides: tuple[str, ...]) -> dict[str, Any]:
    return compose_file(Path(path), list(overrides))


def _hydra_problem(file: str, exc: BaseException, field: str = "") -> ConfigProblem:
    """Hydra wraps the useful message (an OmegaConf grammar or key error) in its own exceptions."""
    while not str(exc).strip() and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else type(exc).__name__
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    return ConfigProblem(file, field or key, None, msg)


def apply_part_overrides(data: dict[str, Any], overrides: tuple[str, ...], file: str) -> tuple[dict[str, Any], list[ConfigProblem]]:
    """Apply ``field.path=value`` to one part; new keys are allowed (pydantic rejects unknown ones)."""
    if not overrides:
        return data, []
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(data)
    problems = []
    for ov in overrides:
        key, _, value = ov.partition("=")
        try:
            parsed = OmegaConf.from_dotlist([f"v={value}"])["v"]
            OmegaConf.update(cfg, key, parsed, merge=False, force_add=True)
        except Exception as exc:  # noqa: BLE001 - OmegaConf grammar errors
            problems.append(_hydra_problem(file, exc, key))
    return OmegaConf.to_container(cfg, resolve=True), problems  # type: ignore[return-value]


def expand_placeholders(value: Any, placeholders: dict[str, str]) -> Any:
    """Expand {workspace}-style placeholders and ~ in path strings of a part."""
    if isinstance(value, str):
        for k, v in placeholders.items():
            value = value.replace("{" + k + "}", v)
        return os.path.expanduser(value) if value.startswith("~") else value
    if isinstance(value, dict):
        return {k: expand_placeholders(v, placeholders) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_placeholders(v, placeholders) for v in value]
    return value


_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def _unresolved(value: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(path, m) for m in _PLACEHOLDER.findall(value)]
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _unresolved(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [x for i, v in enumerate(value) for x in _unresolved(v, f"{path}[{i}]")]
    return []


def load_experiment(ref: str, overrides: list[str] | tuple[str, ...] = (), *, config_root: Path | None = None,
                    placeholders: dict[str, str] | None = None) -> ResolvedExperiment:
    """Compose, resolve and validate; raise ConfigError listing every problem found."""
    if placeholders is None:
        from maelflow.placeholders import placeholders_for
        from maelflow.workspace import Workspace

        placeholders = placeholders_for(Workspace.resolve())
    placeholders = dict(placeholders)
    path, root = locate_experiment(ref, config_root)
    exp_overrides, part_overrides, problems = split_overrides(overrides)
    try:
        raw = compose_file(path, exp_overrides)
    except OverrideError as exc:
        raise ConfigError(problems + [ConfigProblem(str(path), exc.key, exc.value, exc.reason)]) from None
    except Exception as exc:  # Hydra/OmegaConf: bad YAML, bad interpolation
        raise ConfigError(problems + [_hydra_problem(str(path), exc)]) from None
    raw.setdefault("name", path.stem)
    try:
        experiment = Experiment.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(problems + problems_from_validation(err, str(path))) from None

    resolved: dict[str, dict[str, Any]] = {"site": {}, "dataset": {}, "training": {}}
    for kind, (folder, model) in PART_KINDS.items():
        names = getattr(experiment, folder)
        for i, name in enumerate(names):
            part_file = root / folder / f"{name}.yaml"
            if not part_file.is_file():
                known = sorted(p.stem for p in (root / folder).glob("*.yaml") if not p.stem.startswith("_"))
                problems.append(ConfigProblem(str(path), f"{folder}[{i}]", name,
                                              f"no {kind} file {part_file}; known: {', '.join(known) or 'none'}"))
                continue
            ovs = tuple(part_overrides.pop((kind, name), []))
            try:
                data = _load_part_cached(str(part_file), part_file.stat().st_mtime, ())
            except Exception as exc:
                problems.append(_hydra_problem(str(part_file), exc))
                continue
            data, bad = apply_part_overrides(dict(data), ovs, str(part_file))
            if bad:
                problems.extend(bad)
                continue
            data.setdefault("name", name)
            if data["name"] != name:
                problems.append(ConfigProblem(str(part_file), "name", data["name"],
                                              f"must match the file name {name!r}"))
                continue
            expanded = expand_placeholders(data, placeholders)
            unknown = _unresolved(expanded)
            if unknown:
                from maelflow.placeholders import hint

                for field_path, ph in unknown:
                    problems.append(ConfigProblem(str(part_file), field_path, "{" + ph + "}", hint(ph)))
                continue
            if kind == "dataset" and isinstance(expanded.get("recipe"), str) and not os.path.isabs(expanded["recipe"]):
                expanded["recipe"] = str(root / expanded["recipe"])  # relative to the config root
            try:
                resolved[kind][name] = model.model_validate(expanded)
            except ValidationError as err:
                given = {o.split("=", 1)[0] for o in ovs}
                for p in problems_from_validation(err, str(part_file)):
                    if p.field in given:  # say where the value came from
                        p = ConfigProblem(p.file, p.field, p.value, p.reason + " (value given on the command line)")
                    problems.append(p)
    for (kind, name), ovs in part_overrides.items():
        problems.append(ConfigProblem("<command line>", f"{kind}.{name}", ovs[0],
                                      f"the experiment has no {kind} named {name!r}"))

    result = ResolvedExperiment(experiment, resolved["site"], resolved["dataset"], resolved["training"],
                                source_file=str(path), overrides=tuple(overrides), config_root=str(root),
                                placeholders=placeholders)
    from maelflow.config.checks import cross_check
    problems.extend(cross_check(result))
    if problems:
        raise ConfigError(problems)
    return result
