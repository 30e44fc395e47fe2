"""What the suite of one experiment is made of: families, tasks and their ecFlow attributes.

Kept apart from the ecFlow API calls (builder.py) so the shape of the suite reads in one place:
publish once per dataset, then per site data -> train -> register joined by triggers.
"""

from __future__ import annotations

from maelflow.config.loader import ResolvedExperiment
from maelflow.config.names import node_name
from maelflow.suite.operations_layout import operations_families
from maelflow.suite.spec import FamilySpec, SuiteSpec, TaskSpec
from maelflow.suite.training_tasks import train_tasks

__all__ = ["FamilySpec", "SuiteSpec", "TaskSpec", "suite_layout"]


def jobs_limit(site: str) -> str:
    return f"{node_name(site)}_jobs"


def transfers_limit(site: str) -> str:
    return f"{node_name(site)}_transfers"


def benchmark_name(rx: ResolvedExperiment) -> str:
    bm = rx.experiment.benchmark
    return (bm.name if bm and bm.name else None) or rx.name


def benchmark_family(rx: ResolvedExperiment, suite: str) -> FamilySpec:
    """``benchmark/<site>/<training>/r<N>/{train,sync}`` then ``benchmark/report``.

    Every repeat is its own task and MLflow run (its own run folder: MAELFLOW_REPEAT), and a site's
    runs go one after another, so that repeats do not compete with each other for the machine. A
    site's runs wait for its data family: staging is never part of what is timed. The report runs
    beside the server once every site is done.
    """
    bm = rx.experiment.benchmark
    name = benchmark_name(rx)
    fam = FamilySpec("benchmark", variables={"MAELFLOW_BENCHMARK": name}, cron=bm.cron,
                     labels=[("info", f"benchmark {name}: {bm.repeats} repeat(s) of "
                              f"{', '.join(rx.experiment.benchmark_trainings)} on {', '.join(rx.experiment.sites)}")])
    for site_name in rx.experiment.sites:
        sn = node_name(site_name)
        site_fam = FamilySpec(sn, variables={"SITE": site_name}, inlimits=[jobs_limit(site_name)],
                              trigger=f"/{suite}/{sn}/data == complete" if rx.experiment.datasets else None)
        previous: str | None = None
        for tname in rx.experiment.benchmark_trainings:
            tfam = FamilySpec(node_name(tname), variables={"TRAINING": tname},
                              trigger=f"{previous} == complete" if previous else None)
            prev_repeat: str | None = None
            for r in range(1, bm.repeats + 1):
                tfam.children.append(FamilySpec(f"r{r}", variables={"MAELFLOW_REPEAT": str(r)},
                                                trigger=f"{prev_repeat} == complete" if prev_repeat else None,
                                                children=train_tasks(rx.trainings[tname])))
                prev_repeat = f"r{r}"
            site_fam.children.append(tfam)
            previous = node_name(tname)
        fam.children.append(site_fam)
    sites = " and ".join(f"{node_name(s)} == complete" for s in rx.experiment.sites)
    fam.children.append(TaskSpec("report", "report", labels=[("info", ""), ("report", ""), ("headline", ""),
                                                                  ("catalogue", "")],
                                 trigger=sites, runs_on="server"))
    return fam


def suite_layout(rx: ResolvedExperiment, variables: dict[str, str]) -> SuiteSpec:
    suite = node_name(rx.name)
    limits: list[tuple[str, int]] = []
    children: list[FamilySpec | TaskSpec] = [
        TaskSpec("provenance", "provenance", labels=[("info", "")]),
    ]

    publish = FamilySpec("publish", labels=[("info", "publish datasets to the European Weather Cloud")])
    for ds in rx.experiment.datasets:
        tasks = []
        if rx.datasets[ds].recipe or rx.datasets[ds].generator:
            tasks.append(TaskSpec("build", "build", labels=[("info", "")]))
        tasks.append(TaskSpec("publish", "publish", meters=[("progress", 0, 100)],
                              labels=[("info", ""), ("rate", "")], events=["manifest"],
                              trigger="build == complete" if len(tasks) else None))
        publish.children.append(FamilySpec(node_name(ds), variables={"DATASET": ds}, children=tasks))
    if publish.children:
        children.append(publish)

    for site_name in rx.experiment.sites:
        site = rx.sites[site_name]
        sn = node_name(site_name)
        limits.append((jobs_limit(site_name), site.limits.jobs))
        limits.append((transfers_limit(site_name), site.limits.transfers))
        fam = FamilySpec(sn, variables={"SITE": site_name}, inlimits=[jobs_limit(site_name)],
                         labels=[("info", f"{site.description or site_name} ({site.scheduler}, {site.reporting})")])
        stages: list[FamilySpec | TaskSpec] = []
        for ds in rx.experiment.datasets:
            stages.append(FamilySpec(node_name(ds), variables={"DATASET": ds}, children=[
                TaskSpec("stage", "stage", meters=[("progress", 0, 100)], labels=[("info", ""), ("rate", "")],
                         events=["verified"], inlimits=[transfers_limit(site_name)],
                         trigger=f"/{suite}/publish/{node_name(ds)}/publish == complete",
                         runs_on="login" if site.internet.login else "server"),
                TaskSpec("locate", "locate", labels=[("info", "")], trigger="stage == complete", runs_on="server")]))
        previous = None
        if stages:
            fam.children.append(FamilySpec("data", children=stages))
            previous = "data"
        regular = rx.experiment.regular_trainings
        if regular:
            train = FamilySpec("train", trigger=f"{previous} == complete" if previous else None)
            register = FamilySpec("register", trigger="train == complete")
            for tname in regular:
                train.children.append(FamilySpec(node_name(tname), variables={"TRAINING": tname},
                                                 children=train_tasks(rx.trainings[tname])))
                register.children.append(FamilySpec(node_name(tname), variables={"TRAINING": tname}, children=[
                    TaskSpec("register", "register", labels=[("info", "")], runs_on="server")]))
            fam.children.extend([train, register])
        fam.children.extend(operations_families(rx, site_name))
        children.append(fam)

    if rx.experiment.benchmark is not None:
        children.append(benchmark_family(rx, suite))
    return SuiteSpec(suite, variables, limits, children,
                     labels=[("info", rx.experiment.description or rx.name)])
