#!/usr/bin/env python3
"""Benchmark: build 100 experiments x 4 sites with maelflow, against bare ecflow.Defs construction.

maelflow's build = Hydra composition + pydantic validation + cross checks + Defs + ecFlow's check()
and job-creation check + writing the .def, includes and task scripts. The comparison is the floor:
the same suite tree built with the raw ecflow API and saved as a .def, nothing else. The headline
(last line) is maelflow's total time, its ratio to the 2 s target, and its ratio to the floor.

BENCH_SMALL=1 runs 20 experiments (same comparison, a fraction of the time).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ecflow
import yaml

REPO = Path(__file__).resolve().parents[1]
SITES = ["lumi", "leonardo", "marenostrum5", "jupiter"]


def make_configs(root: Path, n: int) -> list[Path]:
    shutil.copytree(REPO / "configs", root)
    for i in range(3):
        (root / "datasets" / f"era5-o96-{i}.yaml").write_text(yaml.safe_dump(
            {"name": f"era5-o96-{i}", "source": f"/data/era5-o96-{i}.zarr"}))
    for i in range(2):
        (root / "trainings" / f"gnn-{i}.yaml").write_text(yaml.safe_dump(
            {"name": f"gnn-{i}", "application": "maelflow.training.examples.tiny:TinyForecaster",
             "datamodule": "maelflow.training.examples.tiny:ZarrPairs", "datasets": [f"era5-o96-{i}"],
             "gpus_per_node": 4, "nodes": 2, "time_limit": "12:00:00", "config": {"max_epochs": 10}}))
    files = []
    for i in range(n):
        p = root / "experiments" / f"exp{i:03d}.yaml"
        p.write_text(yaml.safe_dump({"name": f"exp{i:03d}", "description": f"benchmark experiment {i}",
                                     "sites": SITES, "datasets": [f"era5-o96-{j}" for j in range(3)],
                                     "trainings": ["gnn-0", "gnn-1"]}))
        files.append(p)
    return files


def maelflow_build(files: list[Path], out: Path) -> float:
    from maelflow.config.loader import load_experiment
    from maelflow.suite.builder import build_suite
    from maelflow.workspace import Workspace

    ws = Workspace(out / "ws")
    t0 = time.perf_counter()
    for f in files:
        rx = load_experiment(str(f), placeholders={"workspace": str(ws.root)})
        build_suite(rx, out / "suites" / rx.name, ws)
    return time.perf_counter() - t0


def raw_defs(n: int, out: Path) -> float:
    """The same tree (families, tasks, triggers, limits, meters, labels, events) with bare ecflow."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(n):
        name = f"exp{i:03d}"
        defs = ecflow.Defs()
        s = defs.add_suite(name)
        s.add_variable("ECF_HOME", str(out))
        s.add_task("provenance").add_label("info", "")
        pub = s.add_family("publish")
        for d in range(3):
            t = pub.add_family(f"era5_o96_{d}").add_task("publish")
            t.add_meter("progress", 0, 100); t.add_label("info", ""); t.add_event("manifest")
        for site in SITES:
            s.add_limit(f"{site}_jobs", 8); s.add_limit(f"{site}_transfers", 4)
            f = s.add_family(site); f.add_variable("SITE", site); f.add_inlimit(f"{site}_jobs", f"/{name}")
            data = f.add_family("data")
            for d in range(3):
                t = data.add_family(f"era5_o96_{d}").add_task("stage")
                t.add_trigger(f"/{name}/publish/era5_o96_{d}/publish == complete")
                t.add_meter("progress", 0, 100); t.add_event("verified"); t.add_inlimit(f"{site}_transfers", f"/{name}")
            tr = f.add_family("train"); tr.add_trigger("data == complete")
            rg = f.add_family("register"); rg.add_trigger("train == complete")
            for g in range(2):
                t = tr.add_family(f"gnn_{g}").add_task("train")
                t.add_meter("epoch", 0, 10); t.add_label("info", ""); t.add_event("checkpoint")
                rg.add_family(f"gnn_{g}").add_task("register").add_label("info", "")
        assert defs.check() == ""
        defs.save_as_defs(str(out / f"{name}.def"))
    return time.perf_counter() - t0


def main() -> None:
    n = 20 if os.environ.get("BENCH_SMALL") else 100
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_configs(tmp / "configs", n)
        maelflow_build(files[:2], tmp / "warm")  # imports and Hydra start-up, paid once per process
        runs = [maelflow_build(files, tmp / f"m{r}") for r in range(3)]
        floor = [raw_defs(n, tmp / f"raw{r}") for r in range(3)]
    best, base = min(runs), min(floor)
    print(f"experiments: {n} x {len(SITES)} sites (3 datasets, 2 trainings each)")
    print(f"maelflow build (compose+validate+Defs+checks+files): runs {', '.join(f'{r:.3f}' for r in runs)} s")
    print(f"raw ecflow.Defs + save_as_defs (floor):            runs {', '.join(f'{r:.3f}' for r in floor)} s")
    per = best / n * 1000
    target = 2.0 * n / 100
    print(f"maelflow builds {n} experiments x {len(SITES)} sites in {best:.3f} s ({per:.1f} ms each): "
          f"{best / target:.2f} x the {target:.1f} s target, {best / base:.1f} x the raw ecflow floor")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
