"""Checks that need more than one part: a training against its sites and datasets.

These run at ``maelflow validate`` time so a config that cannot run fails here, not on the HPC.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from maelflow.config.errors import ConfigProblem
from maelflow.config.names import node_name


@lru_cache(maxsize=256)
def import_path_problem(path: str) -> str | None:
    """Why ``package.module:Class`` cannot be loaded here, found without importing the module
    (importing a training application pulls in torch: seconds, at every validate)."""
    import ast
    import importlib.util

    module, _, name = path.partition(":")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        return f"module {module!r} cannot be found: {exc}"
    if spec is None:
        return f"no module {module!r} in this Python environment (is the application installed?)"
    top = name.split(".")[0]
    if spec.origin and spec.origin.endswith(".py"):
        try:
            tree = ast.parse(Path(spec.origin).read_text())
        except (OSError, SyntaxError) as exc:
            return f"module {module!r} cannot be read: {exc}"
        defined = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        defined |= {a.asname or a.name for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in n.names}
        if top not in defined:
            return f"module {module!r} defines no {top!r}"
    return None


def cross_check(rx) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    root = Path(rx.config_root)
    exp_file = rx.source_file
    problems += services_profile_problems(rx)
    # names become ecFlow node names: two that differ only in '-' vs '_' would collide
    for folder in ("sites", "datasets", "trainings"):
        seen: dict[str, str] = {}
        for i, name in enumerate(getattr(rx.experiment, folder)):
            nn = node_name(name)
            if nn in seen:
                problems.append(ConfigProblem(exp_file, f"{folder}[{i}]", name,
                                              f"becomes the same ecFlow node name {nn!r} as {seen[nn]!r}"))
            seen[nn] = name
    for dname, dataset in rx.datasets.items():   # a dataset built by a generator given by import path
        why = import_path_problem(dataset.generator) if dataset.generator else None
        if why:
            problems.append(ConfigProblem(str(root / "datasets" / f"{dname}.yaml"), "generator", dataset.generator,
                                          why))
    for tname, training in rx.trainings.items():
        tfile = str(root / "trainings" / f"{tname}.yaml")
        for field in ("application", "datamodule"):
            path = getattr(training, field)
            if path and path != "anemoi":
                why = import_path_problem(path)
                if why:
                    problems.append(ConfigProblem(tfile, field, path, why))
        if training.application != "anemoi" and not training.datamodule:
            problems.append(ConfigProblem(tfile, "datamodule", None,
                                          "an application given by import path needs its LightningDataModule"))
        if training.application == "anemoi":  # its keys against each site's anemoi-training release
            from maelflow.training.anemoi_versions import check_training

            problems.extend(check_training(tfile, tname, training, rx.sites))
        for j, ds in enumerate(training.datasets):
            if ds not in rx.experiment.datasets:
                problems.append(ConfigProblem(tfile, f"datasets[{j}]", ds,
                                              "dataset is not listed in the experiment's datasets "
                                              f"({', '.join(rx.experiment.datasets) or 'none'})"))
        for sname, site in rx.sites.items():
            if training.gpus_per_node > site.gpus.per_node:
                problems.append(ConfigProblem(
                    tfile, "gpus_per_node", training.gpus_per_node,
                    f"site {sname!r} has {site.gpus.per_node} GPUs per node"))
            if site.slurm is not None:
                from maelflow.config.models import parse_slurm_time
                if parse_slurm_time(training.time_limit) > parse_slurm_time(site.slurm.max_time):
                    problems.append(ConfigProblem(
                        tfile, "time_limit", training.time_limit,
                        f"longer than site {sname!r} allows ({site.slurm.max_time})"))
    return problems


def services_profile_problems(rx) -> list[ConfigProblem]:
    """The experiment's services profile (``services: NAME``), validated: a secret written inline,
    an external service without its address, an unknown key (maelflow.config.profile)."""
    if not rx.experiment.services:
        return []
    from maelflow.config.errors import ConfigError
    from maelflow.config.profile import load_file, locate

    try:
        load_file(locate(rx.experiment.services, Path(rx.config_root)))
    except ConfigError as exc:
        return list(exc.problems)
    return []
