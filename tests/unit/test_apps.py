"""The MAELSTROM applications (maelflow.apps) without services: seeded generators that anemoi-datasets
reads, the scores behind skill_vs_baseline, each application trained as the launcher builds it
until it beats its baseline, the dataset 'generator' route of the config and the build, the
per-application report tables, and the real-size configs."""

from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from maelflow.apps.common import SKILL_METRIC, content_digest, held_out, skill
from maelflow.config.errors import ConfigError
from maelflow.config.loader import load_experiment
from maelflow.config.models import Dataset
from maelflow.datasets.build import GENERATED_BY, DatasetBuildError, build_dataset
from maelflow.reports import benchmark as bm
from tests.conftest import REPO

pytestmark = pytest.mark.unit
APPS = ["ap1", "ap2", "ap3", "ap4", "ap5", "ap6"]
PLACEHOLDERS = {"maelflow": "maelflow"}


def _experiment(tmp_path: Path, name: str = "maelstrom", *overrides: str):
    """The project's own experiment ``name``, its datasets placed under ``tmp_path``."""
    return load_experiment(str(REPO / "configs" / "experiments" / f"{name}.yaml"), list(overrides),
                           placeholders={**PLACEHOLDERS, "workspace": str(tmp_path)})


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Each application's dataset, as its config builds it (once for the module)."""
    root = tmp_path_factory.mktemp("apps")
    rx = _experiment(root)
    out = {}
    for app in APPS:
        (ds_name,) = rx.trainings[app].datasets
        ds = rx.datasets[ds_name]
        out[app] = build_dataset(ds, Path(ds.source))
    return out


def test_generators_are_seeded_and_anemoi_datasets_reads_them(built, tmp_path):
    from anemoi.datasets import open_dataset

    rx = _experiment(tmp_path)
    for app, path in built.items():
        (ds_name,) = rx.trainings[app].datasets
        ds = rx.datasets[ds_name]
        assert path.name == f"{ds_name}.zarr"
        # the same generator call gives the same bytes; another seed gives other data
        gen = importlib.import_module(ds.generator.split(":")[0]).generate
        again = gen(tmp_path / f"{app}-again.zarr", **ds.generator_options)
        other = gen(tmp_path / f"{app}-other.zarr", **{**ds.generator_options, "seed": 1})
        digest = content_digest(again)
        assert content_digest(other) != digest
        import zarr

        recorded = zarr.open_group(str(path), mode="r").attrs[GENERATED_BY]
        assert recorded == {"generator": ds.generator, "options": ds.generator_options}
        if app == "ap2":   # text: a plain zarr of its own layout
            root = zarr.open_group(str(path), mode="r")
            assert root["text"].shape == root["label"].shape == (1600,)
            assert 0.2 < root.attrs["rain_fraction"] < 0.5
            continue
        opened = open_dataset(str(path))
        assert opened.shape[0] == len(opened.dates) and opened.shape[1] == len(opened.variables)
        assert np.all(np.isfinite(opened.statistics["stdev"]))
        assert opened.field_shape == tuple(zarr.open_group(str(path), mode="r").attrs["field_shape"])
    assert open_dataset(str(built["ap4"])).shape[2] == 5                    # ensemble members
    assert "obs_2t" in open_dataset(str(built["ap1"])).variables


def test_scores_behind_the_skill():
    from maelflow.apps.ap1 import pinball
    from maelflow.apps.ap4 import crps_gaussian

    assert skill(1.0, 4.0) == 0.75 and skill(5.0, 4.0) < 0 and skill(0.0, 0.0) == 0.0
    # pinball: a deterministic forecast's loss is the mean over quantiles of q*e (e>0) or (q-1)*e
    y = torch.tensor([[1.0]])
    p = torch.zeros(1, 3, 1)
    assert math.isclose(float(pinball(p, y)), (0.1 + 0.5 + 0.9) / 3, rel_tol=1e-6)
    # Gaussian CRPS against its definition, the integral of (F(x) - 1{x >= y})^2
    mu, sigma, obs = 0.3, 1.7, -0.4
    x = torch.linspace(-20, 20, 200001, dtype=torch.float64)
    cdf = 0.5 * (1 + torch.erf((x - mu) / (sigma * math.sqrt(2))))
    numeric = float(torch.trapezoid((cdf - (x >= obs).double()) ** 2, x))
    closed = float(crps_gaussian(torch.tensor(mu), torch.tensor(sigma), torch.tensor(obs)))
    assert math.isclose(closed, numeric, rel_tol=1e-4)
    train, val = held_out(10, 0.2)
    assert list(val) == [8, 9] and list(train) == list(range(8))


@pytest.mark.parametrize("app", APPS)
def test_each_application_beats_its_baseline(app, built, tmp_path):
    """Built exactly as the launcher builds it (DataModule(**config), Model(**config, **model_kwargs)),
    trained for its configured epochs on CPU: positive skill on the held-out data."""
    import pytorch_lightning as pl

    from maelflow.training.runs import import_object

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    training = yaml.safe_load((REPO / "configs" / "trainings" / f"{app}.yaml").read_text())
    cfg = dict(training["config"])
    epochs = cfg.pop("max_epochs")
    dm = import_object(training["datamodule"])(dataset_paths=[str(built[app])], **cfg)
    dm.setup("fit")
    model = import_object(training["application"])(**cfg, **dm.model_kwargs)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    m = trainer.callback_metrics
    assert float(m[SKILL_METRIC]) > 0.05, {k: float(v) for k, v in m.items()}
    assert float(m["val_score"]) < float(m["baseline_score"])
    assert math.isclose(float(m[SKILL_METRIC]), 1 - float(m["val_score"]) / float(m["baseline_score"]), rel_tol=1e-4)


def _dataset(tmp_path, **fields) -> Dataset:
    return Dataset.model_validate({"name": "maelstrom-ap5-synth-16x16-2020-2020-24h-v1",
                                   "source": str(tmp_path / "d.zarr"), **fields})


def test_generator_config_errors_name_the_field(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="recipe.*or by a 'generator', not both"):
        _dataset(tmp_path, recipe="recipes/x.yaml", generator="maelflow.apps.ap5_data:generate")
    with pytest.raises(ValidationError, match="generator\n.*import path"):
        _dataset(tmp_path, generator="maelflow.apps.ap5_data.generate")
    with pytest.raises(ValidationError, match="no 'generator'"):
        _dataset(tmp_path, generator_options={"seed": 1})
    # a generator that is not there: validate says which file, field and value
    with pytest.raises(ConfigError) as err:
        _experiment(tmp_path, "ap5", "dataset.maelstrom-ap5-synth-64x64-2020-2020-24h-v1-x8.generator="
                                     "maelflow.apps.nowhere:generate")
    (problem,) = [p for p in err.value.problems if p.field == "generator"]
    assert problem.file.endswith("datasets/maelstrom-ap5-synth-64x64-2020-2020-24h-v1-x8.yaml")
    assert problem.value == "maelflow.apps.nowhere:generate" and "no module" in problem.reason


def test_generated_dataset_is_kept_replaced_or_refused(tmp_path):
    opts = {"seed": 0, "grid": [16, 16], "factor": 4, "times": 6}
    ds = _dataset(tmp_path, generator="maelflow.apps.ap5_data:generate", generator_options=opts)
    path = build_dataset(ds, tmp_path / "d.zarr")
    first = content_digest(path)
    stamp = (path / ".zattrs").stat().st_mtime_ns
    assert build_dataset(ds, path) == path and (path / ".zattrs").stat().st_mtime_ns == stamp   # same call: kept
    changed = _dataset(tmp_path, generator="maelflow.apps.ap5_data:generate", generator_options={**opts, "seed": 3})
    build_dataset(changed, path)                                  # another call: generated again, in place
    assert content_digest(path) != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d.zarr")]   # no scratch left
    bad = _dataset(tmp_path, generator="maelflow.apps.ap5_data:generate", generator_options={**opts, "factor": 5})
    with pytest.raises(DatasetBuildError, match="not divisible by the coarsening factor 5"):
        build_dataset(bad, tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists()
    unknown = _dataset(tmp_path, generator="maelflow.apps.ap5_data:generate", generator_options={"colour": 1})
    with pytest.raises(DatasetBuildError, match="colour"):
        build_dataset(unknown, tmp_path / "bad.zarr")


def _run(training: str, site: str, n: int, *, batch_mean: float, skill_value: float | None) -> bm.RunTiming:
    stats = {key: {"count": 10.0, "mean": batch_mean * f, "min": 0.0, "median": batch_mean * f, "max": 1.0,
                   "stdev": 0.0} for key, f in (("batch", 1.0), ("data_loading", 0.25), ("epoch", 40.0))}
    metrics = {"timing/samples_per_s": 100.0 / batch_mean, "timing/time_to_train_s": 50 * batch_mean,
               "timing/data_loading_share": 0.2, "memory/peak_rss_bytes": 2**30}
    if skill_value is not None:
        metrics[SKILL_METRIC] = skill_value
    return bm.RunTiming(run_id=f"{n:032x}", name=training, experiment="maelstrom", training=training, site=site,
                        start_time=n, stats=stats, metrics=metrics, tags={})


def test_report_has_one_table_per_application_with_sites_as_columns(tmp_path):
    runs = [_run("ap1", "local", 1, batch_mean=0.010, skill_value=0.6),
            _run("ap1", "localhpc", 2, batch_mean=0.020, skill_value=0.5),
            _run("ap1", "localhpc", 3, batch_mean=0.030, skill_value=0.7),
            _run("ap2", "local", 4, batch_mean=0.004, skill_value=None)]
    report = bm.Report("file:///mlruns", runs)
    ap1, ap2 = bm.application_tables(report)
    assert (ap1.training, ap1.sites, ap2.sites) == ("ap1", ["local", "localhpc"], ["local"])
    rows = dict(ap1.rows)
    assert rows["runs"] == ["1", "2"]
    assert rows["batch"] == ["10.00 ms", "25.00 ms"]             # a site's runs: the median of their means
    assert rows["IO (data loading)"] == ["2.50 ms", "6.25 ms"] and rows["epoch"] == ["400.00 ms", "1.00 s"]
    assert rows["samples/s"] == ["10000.0", "4166.7"] and rows["skill vs baseline"] == ["0.600", "0.600"]
    assert rows["peak memory"] == ["1.00 GiB RSS", "1.00 GiB RSS"]
    assert "skill vs baseline" not in dict(ap2.rows)              # an application that does not log it
    files = bm.write_report(report, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Applications" in md and "### ap1\n\n| | local | localhpc |" in md and "### ap2" in md
    assert "<h3>ap1</h3>" in (tmp_path / "out" / "index.html").read_text()
    assert "applications.csv" in {f.name for f in files}
    csv_rows = (tmp_path / "out" / "applications.csv").read_text().splitlines()
    assert "ap1,batch,localhpc,25.00 ms" in csv_rows


def test_real_size_configs_validate_for_every_eurohpc_site(tmp_path):
    rx = _experiment(tmp_path, "maelstrom-eurohpc", "sites=[jupiter,leonardo,lumi,marenostrum5]")
    assert sorted(rx.trainings) == [f"{a}-full" for a in APPS]
    for name, training in rx.trainings.items():
        app = name.removesuffix("-full")
        small = yaml.safe_load((REPO / "configs" / "trainings" / f"{app}.yaml").read_text())
        # the same application and DataModule as the test-size training, on a real dataset, on GPUs
        assert (training.application, training.datamodule) == (small["application"], small["datamodule"])
        assert training.gpus_per_node >= 1
        (ds,) = training.datasets
        assert rx.datasets[ds].generator is None and "REAL-SIZE" in rx.datasets[ds].description


def test_trainings_starting_at_once_share_the_experiment(tmp_path, monkeypatch):
    """Six trainings of one suite start together: the one that loses the race to create the MLflow
    experiment (MLflow answers RESOURCE_ALREADY_EXISTS) uses the experiment the winner created."""
    from mlflow import MlflowClient

    from maelflow.tracking.mlflow_runs import ensure_experiment

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    winner = MlflowClient(uri).create_experiment("maelstrom")

    class LateClient(MlflowClient):
        """Looked before the winner created it: its first lookup finds nothing."""

        looked = False

        def get_experiment_by_name(self, name):
            if not self.looked:
                self.looked = True
                return None
            return super().get_experiment_by_name(name)

    assert ensure_experiment(LateClient(uri), "maelstrom") == winner
    assert ensure_experiment(MlflowClient(uri), "other") != winner        # missing: created
