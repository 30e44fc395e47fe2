"""One forecast cycle: the inference config we generate, anemoi-inference's own commands, provenance.

The cycle's ``resolve`` task (beside the server) has already written ``cycle.json`` in the cycle's
folder on the site: which version ``model@alias`` named when the cycle started, its checkpoint
(checked to exist), the staged dataset and the initial date. Here, on the site:

1. ``anemoi-inference validate <checkpoint>``: the environment against the checkpoint's recorded
   packages (a failure stops the cycle before any output);
2. ``anemoi-inference run inference.yaml``, with the config generated from ``cycle.json``
   (checkpoint, device, date, lead time, ``input: {dataset: <staged zarr>}``, ``output``);
3. the output gets provenance attributes (NetCDF global attributes, or the zarr's ``.zattrs``):
   model, version, alias, checkpoint uuid and SHA-256, training, run, dataset, dates, producer;
4. ``forecast.json`` records the output (path, size, SHA-256) for the ``publish`` task.

A model trained by a Lightning application given by import path forecasts through that
application's ``predict`` entry point instead of steps 1-2 (:func:`predict_entry_point`).

``publish`` (beside the server) copies the output to the EWC store under
``<prefix>/<experiment>/<model>/<YYYYMMDDHH>/`` and registers a ``forecasts`` entry whose lineage
reaches the dataset through the model version, its checkpoint and its training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml

from maelflow.errors import MaelflowError

CYCLE_FILE = "cycle.json"
RESULT_FILE = "forecast.json"
CONFIG_FILE = "inference.yaml"
ATTR_PREFIX = "maelflow_"


class ForecastError(MaelflowError):
    """A cycle that cannot produce its forecast (the message is the task's abort reason)."""


def cycle_date(ymd: str | int, hour: int) -> datetime:
    text = str(ymd)
    try:
        return datetime(int(text[:4]), int(text[4:6]), int(text[6:8]), hour)
    except (ValueError, IndexError):
        raise ForecastError(f"cycle {ymd!r} is not a date YYYYMMDD") from None


def output_name(cycle: dict) -> str:
    stamp = datetime.fromisoformat(cycle["date"]).strftime("%Y%m%d%H")
    ext = "nc" if cycle["output"] == "netcdf" else "zarr"
    return f"{cycle['model']}-v{cycle['version']}-{stamp}-{cycle['lead_time']}h.{ext}"


def inference_config(cycle: dict, output: Path) -> dict[str, Any]:
    """The anemoi-inference run config of a cycle (keys of its ``top-level`` reference)."""
    out_kind = cycle["output"]
    return {
        "checkpoint": cycle["checkpoint"],
        "device": cycle.get("device") or "cpu",
        "date": cycle["date"],
        "lead_time": int(cycle["lead_time"]),
        "input": {"dataset": cycle["dataset_path"]},
        "output": {out_kind: {"path": str(output)} if out_kind == "netcdf" else {"store": str(output)}},
    }


def anemoi_inference() -> str:
    """The ``anemoi-inference`` command beside this Python, else on PATH."""
    beside = Path(sys.executable).with_name("anemoi-inference")
    if beside.exists():
        return str(beside)
    found = shutil.which("anemoi-inference")
    if not found:
        raise ForecastError("anemoi-inference is not installed on this site "
                            "(pip install -c constraints.txt 'maelflow[anemoi]')")
    return found


def _last_lines(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-400:]


def _run(argv: list[str], what: str, cwd: Path, log: Path) -> None:
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(argv)}\n")
        fh.flush()
        proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fh.write(proc.stdout)
    sys.stdout.write(proc.stdout)  # the job output keeps anemoi-inference's own log
    sys.stdout.flush()
    if proc.returncode != 0:
        raise ForecastError(f"{what} failed (exit {proc.returncode}): {_last_lines(proc.stdout)} (log {log})")


def predict_entry_point(application: str, cycle: dict, output: Path) -> None:
    """A Lightning application's forecast: its ``predict`` entry point, written where anemoi's would be.

    The application class (the training's ``application`` import path) provides
    ``predict(checkpoint=, dataset=, date=, lead_time=)`` (a class or static method) returning an
    ``xarray.Dataset`` of the forecast: maelflow writes it (NetCDF or zarr), then stamps the same
    provenance attributes and publishes and registers it the same way.
    """
    import xarray as xr

    from maelflow.training.runs import TrainingError, import_object

    try:
        app = import_object(application)
    except TrainingError as exc:
        raise ForecastError(f"cannot load the application of this model: {exc}") from None
    predict = getattr(app, "predict", None)
    if not callable(predict):
        raise ForecastError(f"application {application} has no 'predict' entry point (a class or static method "
                            "predict(checkpoint=, dataset=, date=, lead_time=) returning an xarray.Dataset)")
    result = predict(checkpoint=cycle["checkpoint"], dataset=cycle["dataset_path"],
                     date=datetime.fromisoformat(cycle["date"]), lead_time=int(cycle["lead_time"]))
    if not isinstance(result, xr.Dataset):
        raise ForecastError(f"{application}.predict returned {type(result).__name__}, not an xarray.Dataset")
    if cycle["output"] == "netcdf":
        result.to_netcdf(output)
    else:
        result.to_zarr(output, mode="w")


def file_sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
                size += len(block)
    return size, h.hexdigest()


def provenance_attributes(cycle: dict) -> dict[str, str]:
    """What the output says about where it came from (strings, so every NetCDF reader shows them)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        inference_version = version("anemoi-inference")
    except PackageNotFoundError:  # pragma: no cover
        inference_version = "unknown"
    attrs = {"model": cycle["model"], "model_version": str(cycle["version"]), "alias": cycle["alias"],
             "checkpoint_uuid": cycle.get("weights") or "", "checkpoint_sha256": cycle.get("sha256") or "",
             "checkpoint_path": cycle["checkpoint"], "training": cycle.get("training") or "",
             "run_id": cycle.get("run_id") or "", "dataset": cycle.get("dataset") or "",
             "dataset_path": cycle["dataset_path"], "initial_date": cycle["date"],
             "lead_time_hours": str(cycle["lead_time"]), "experiment": cycle.get("experiment") or "",
             "produced": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "producer": f"maelflow forecast cycle, anemoi-inference {inference_version}"}
    return {ATTR_PREFIX + k: v for k, v in attrs.items()}


def stamp_provenance(output: Path, attrs: dict[str, str]) -> None:
    if output.is_dir():  # zarr: the group's attributes
        zattrs = output / ".zattrs"
        data = json.loads(zattrs.read_text()) if zattrs.exists() else {}
        data.update(attrs)
        zattrs.write_text(json.dumps(data, indent=2))
        return
    import netCDF4

    with netCDF4.Dataset(str(output), "a") as nc:
        nc.setncatts(attrs)


def run_cycle(folder: Path) -> dict:
    """Run the cycle prepared in ``folder`` (its cycle.json); returns and writes forecast.json."""
    cycle_file = folder / CYCLE_FILE
    if not cycle_file.is_file():
        raise ForecastError(f"no {CYCLE_FILE} in {folder}: the cycle's resolve task has not run")
    cycle = json.loads(cycle_file.read_text())
    checkpoint = Path(cycle["checkpoint"])
    if not checkpoint.is_file():
        raise ForecastError(f"{cycle['model']}@{cycle['alias']} is v{cycle['version']}, whose checkpoint "
                            f"{checkpoint} is missing: nothing forecast")
    if not Path(cycle["dataset_path"]).exists():
        raise ForecastError(f"the initial conditions' dataset is not staged at {cycle['dataset_path']}")
    output = folder / output_name(cycle)
    if output.exists():  # a rerun of the cycle starts again
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    application = cycle.get("application") or "anemoi"
    if application != "anemoi":
        predict_entry_point(application, cycle, output)
    else:
        config = inference_config(cycle, output)
        (folder / CONFIG_FILE).write_text("# generated by maelflow from cycle.json\n"
                                          + yaml.safe_dump(config, sort_keys=False))
        log = folder / "anemoi-inference.log"
        exe = anemoi_inference()
        _run([exe, "validate", str(checkpoint)], "anemoi-inference validate", folder, log)
        _run([exe, "run", str(folder / CONFIG_FILE)], "anemoi-inference run", folder, log)
        if not output.exists():
            raise ForecastError(f"anemoi-inference run finished but wrote no {output} (log {log})")
    attrs = provenance_attributes(cycle)
    stamp_provenance(output, attrs)
    size, digest = file_sha256(output)
    result = {"output": str(output), "format": cycle["output"], "size": size, "sha256": digest,
              "attributes": attrs, "config": str(folder / CONFIG_FILE) if application == "anemoi" else application,
              "valid_until": (datetime.fromisoformat(cycle["date"]) + timedelta(hours=int(cycle["lead_time"])))
              .isoformat()}
    (folder / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result
