"""Build an ML-ready zarr from an anemoi-datasets recipe, with the real ``anemoi-datasets create``.

A recipe is an ordinary anemoi-datasets YAML file. Before it is handed to anemoi, maelflow
replaces two placeholders in its text (nothing else is touched, so Hydra-style ``${...}``
references and YAML flow mappings pass through unchanged):

``{synthetic}``
    the path of a synthetic NetCDF file (:func:`make_synthetic_netcdf`: 2 m temperature, 10 m wind
    and mean sea-level pressure, 6-hourly from 2020-01-01 for 28 days, on a 5 degree regular grid
    without the poles) that maelflow generates in the build folder. It needs no network, so a demo
    or a test can build a real anemoi dataset anywhere.
``{recipe_dir}``
    the folder of the recipe file, for inputs stored beside it.

The dataset is created in a hidden sibling folder of the destination (``.NAME.zarr.building/``,
with the filled-in recipe and its generated inputs) and renamed into place only once anemoi has
finished it and its statistics are present: a reader either sees no dataset or a complete one.
The zarr is built there under the recipe's ``name:`` so anemoi checks that name against its
naming convention (a name that does not follow it is only a warning).

A dataset may name a ``generator`` (``package.module:function``) instead of a recipe: a function
that writes the zarr itself, such as the seeded synthetic datasets of the MAELSTROM applications
(:func:`generate_dataset`, same hidden-folder-then-rename guarantee).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from maelflow.errors import MaelflowError

if TYPE_CHECKING:  # pragma: no cover
    from maelflow.config.models import Dataset
    from maelflow.reporting import Reporter

STATISTICS_ARRAYS = ("mean", "stdev", "minimum", "maximum")


class DatasetBuildError(MaelflowError):
    """A dataset could not be built; the message is one line and names the recipe."""


# ------------------------------------------------------------------------------- synthetic input
def make_synthetic_netcdf(path: Path | str, *, start: str = "2020-01-01", days: int = 28, step_hours: int = 6,
                          resolution: float = 5.0, seed: int = 0) -> Path:
    """Write a small synthetic NetCDF (t2m, u10, v10, msl) that anemoi-datasets' ``netcdf`` source reads.

    A regular lat/lon grid of ``resolution`` degrees whose rows are cell centres, so neither pole is
    on the grid (the duplicated pole points of a grid that includes them make anemoi-graphs' area
    weights fail). The defaults give 112 dates on 36 x 72 points, about 4.6 MB.
    """
    import numpy as np
    import xarray as xr

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lats = np.arange(90 - resolution / 2, -90, -resolution)
    lons = np.arange(0, 360, resolution)
    n = days * 24 // step_hours
    times = np.datetime64(f"{start}T00:00", "ns") + np.arange(n) * np.timedelta64(step_hours, "h")
    t = (np.arange(n) * step_hours / 24.0)[:, None, None]  # days since start
    la = np.radians(lats)[None, :, None]
    lo = np.radians(lons)[None, None, :]
    shape = (n, len(lats), len(lons))
    # smooth, learnable signals: a diurnal cycle that moves with longitude, travelling waves, noise
    t2m = 288 - 35 * np.sin(la) ** 2 + 6 * np.cos(la) * np.cos(2 * np.pi * t + lo) \
        + 2 * np.sin(2 * lo - 2 * np.pi * t / 7) + rng.normal(0, 0.5, shape)
    u10 = 8 * np.cos(2 * la) * np.cos(lo - 2 * np.pi * t / 5) + rng.normal(0, 0.7, shape)
    v10 = 5 * np.sin(2 * la) * np.sin(3 * lo + 2 * np.pi * t / 4) + rng.normal(0, 0.7, shape)
    msl = 101325 + 1200 * np.sin(2 * la) * np.cos(2 * lo - 2 * np.pi * t / 6) + rng.normal(0, 30, shape)
    attrs = {
        "t2m": {"units": "K", "long_name": "2 metre temperature", "standard_name": "air_temperature"},
        "u10": {"units": "m s**-1", "long_name": "10 metre U wind component", "standard_name": "eastward_wind"},
        "v10": {"units": "m s**-1", "long_name": "10 metre V wind component", "standard_name": "northward_wind"},
        "msl": {"units": "Pa", "long_name": "Mean sea level pressure",
                "standard_name": "air_pressure_at_mean_sea_level"},
    }
    values = {"t2m": t2m, "u10": u10, "v10": v10, "msl": msl}
    ds = xr.Dataset(
        {k: (("time", "latitude", "longitude"), np.broadcast_to(v, shape).astype("float32"), attrs[k])
         for k, v in values.items()},
        coords={
            "time": ("time", times),
            "latitude": ("latitude", lats, {"units": "degrees_north", "standard_name": "latitude"}),
            "longitude": ("longitude", lons, {"units": "degrees_east", "standard_name": "longitude"}),
        },
        attrs={"title": "maelflow synthetic surface fields", "source": "maelflow.datasets.make_synthetic_netcdf",
               "Conventions": "CF-1.8"},
    )
    tmp = path.with_name(f".{path.name}.tmp")
    ds.to_netcdf(tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------- recipes
def resolve_recipe(recipe: str, base_dir: Path | None = None) -> Path:
    """The recipe file: absolute, else relative to ``base_dir`` (the config root), else to the CWD."""
    path = Path(os.path.expanduser(recipe))
    candidates = [path] if path.is_absolute() else [*([base_dir / path] if base_dir else []), Path.cwd() / path]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise DatasetBuildError(f"recipe {recipe}: no such file (looked at {', '.join(str(c) for c in candidates)})")


def materialize_recipe(recipe: Path, workdir: Path) -> Path:
    """Write the recipe with its maelflow placeholders filled in to ``workdir/recipe.yaml``."""
    text = recipe.read_text()
    if "{synthetic}" in text:
        nc = make_synthetic_netcdf(workdir / "synthetic.nc")
        text = text.replace("{synthetic}", str(nc))
    text = text.replace("{recipe_dir}", str(recipe.parent))
    out = workdir / "recipe.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def anemoi_datasets_command() -> list[str]:
    """``anemoi-datasets`` of this interpreter's environment (beside sys.executable), else ``-m``."""
    exe = Path(sys.executable).parent / "anemoi-datasets"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "anemoi.datasets"]


_NOISE = re.compile(r"^\s*(File \"|Traceback|\^|~|During handling|The above exception)")


def _error_line(output: str) -> str:
    """The most telling line of a failed anemoi command: the last exception line, else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip() and not _NOISE.match(ln)]
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Exit)\b", ln) or "Error:" in ln:
            return ln
    return lines[-1] if lines else "no output"


def _recipe_name(recipe: Path) -> str | None:
    import yaml

    try:
        name = (yaml.safe_load(recipe.read_text()) or {}).get("name")
    except (yaml.YAMLError, AttributeError) as exc:
        raise DatasetBuildError(f"recipe {recipe}: not a YAML mapping: {_error_line(str(exc))}") from None
    return name if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*", name) else None


def _check_built(path: Path, recipe: Path) -> dict:
    """Raise unless ``path`` is a finished anemoi zarr with statistics; return its attributes."""
    return _check_zarr(path, f"recipe {recipe}", anemoi=True)


def build_dataset(dataset: "Dataset", dest: Path | str, reporter: "Reporter | None" = None, *,
                  base_dir: Path | None = None, overwrite: bool = False) -> Path:
    """Create ``dest`` (an anemoi zarr) from ``dataset.recipe`` with ``anemoi-datasets create``.

    ``base_dir`` is where a relative recipe path is looked up first (pass the config root). An
    existing ``dest`` is kept as it is unless ``overwrite``. Returns ``dest``.
    """
    from maelflow.reporting import Reporter

    reporter = reporter or Reporter({})
    dest = Path(dest).expanduser().absolute()
    if getattr(dataset, "generator", None):
        return generate_dataset(dataset, dest, reporter, overwrite=overwrite)
    if not dataset.recipe:
        raise DatasetBuildError(f"dataset {dataset.name!r} has no recipe to build it from")
    recipe = resolve_recipe(dataset.recipe, base_dir)
    if dest.exists() and not overwrite:
        _check_built(dest, recipe)
        reporter.label("info", f"dataset {dataset.name} already built at {dest}")
        return dest

    # a hidden sibling folder holds the filled-in recipe, its inputs and the zarr being built,
    # named as the recipe names the dataset (anemoi checks that name against its convention)
    scratch = dest.with_name(f".{dest.name}.building")
    shutil.rmtree(scratch, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        reporter.label("info", f"building {dataset.name} from {recipe}")
        ready = materialize_recipe(recipe, scratch / "recipe")
        building = scratch / f"{_recipe_name(ready) or dest.stem}.zarr"
        cmd = [*anemoi_datasets_command(), "create", str(ready), str(building), "--overwrite"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=str(scratch), env={**os.environ, "PYTHONUNBUFFERED": "1"})
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            del tail[:-200]
            if line.strip():
                reporter.throttled("label", "info", f"{dataset.name}: {line.strip()[:200]}", every=2.0)
        rc = proc.wait()
        if rc != 0:
            raise DatasetBuildError(f"recipe {recipe}: anemoi-datasets create failed (exit {rc}): "
                                    f"{_error_line(''.join(tail))}")
        attrs = _check_built(building, recipe)
        if dest.exists():
            shutil.rmtree(dest)
        building.rename(dest)
    except (OSError, ImportError, ValueError) as exc:  # the build folder, the synthetic input
        raise DatasetBuildError(f"recipe {recipe}: {_error_line(str(exc))}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.monotonic() - t0
    shape = attrs.get("shape") or []
    reporter.label("info", f"built {dataset.name}: {len(attrs.get('variables', []))} variables, "
                   f"{attrs.get('start_date')} to {attrs.get('end_date')} every {attrs.get('frequency')}, "
                   f"shape {tuple(shape)} in {seconds:.1f}s")
    return dest


# ----------------------------------------------------------------------------------- generators
GENERATED_BY = "maelflow_generator"   # the zarr attribute that records which generator call made it


def _generated_by(dataset: "Dataset") -> dict:
    import json

    # through JSON, as the zarr attributes keep it (tuples become lists)
    return json.loads(json.dumps({"generator": dataset.generator, "options": dataset.generator_options}))


def _check_generated(path: Path, what: str) -> dict:
    """Raise unless ``path`` is a readable zarr group with arrays (and, in the anemoi layout, finite
    statistics); return its attributes."""
    return _check_zarr(path, what, anemoi=False)


def _check_zarr(path: Path, what: str, *, anemoi: bool) -> dict:
    """The one check of what a build left: a readable zarr group with arrays; with a ``data`` array
    (the anemoi layout, required when ``anemoi``) every statistics array there and finite."""
    import numpy as np
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
        names = list(root.array_keys())
    except Exception as exc:  # noqa: BLE001 - zarr raises several kinds
        raise DatasetBuildError(f"{what}: left no readable zarr at {path}: {_error_line(str(exc))}") from None
    if not names:
        raise DatasetBuildError(f"{what}: wrote a zarr without arrays at {path}")
    if anemoi and "data" not in names:
        raise DatasetBuildError(f"{what}: the dataset has no 'data' array")
    if "data" in names:
        missing = [name for name in STATISTICS_ARRAYS if name not in names]
        if missing:
            raise DatasetBuildError(f"{what}: the dataset has no statistics ({', '.join(missing)} missing)")
        for name in STATISTICS_ARRAYS:
            if not np.all(np.isfinite(root[name][:])):
                raise DatasetBuildError(f"{what}: statistics {name!r} hold non-finite values")
    return dict(root.attrs)


def generate_dataset(dataset: "Dataset", dest: Path | str, reporter: "Reporter | None" = None, *,
                     overwrite: bool = False) -> Path:
    """Create ``dest`` by calling ``dataset.generator`` (``package.module:function``) as
    ``function(path, **dataset.generator_options)``: a seeded synthetic dataset, for example one of
    the MAELSTROM applications' (``maelflow.apps``).

    Like a recipe build, the zarr is written in a hidden sibling folder and renamed into place once
    complete. The call is recorded in the zarr's attributes (``maelflow_generator``): an existing
    ``dest`` made by the same call is kept (unless ``overwrite``), one made otherwise is replaced.
    """
    import importlib

    import zarr

    from maelflow.reporting import Reporter

    reporter = reporter or Reporter({})
    dest = Path(dest).expanduser().absolute()
    what = f"dataset {dataset.name}: generator {dataset.generator}"
    call = _generated_by(dataset)
    if dest.exists() and not overwrite:
        try:
            attrs = _check_generated(dest, what)
        except DatasetBuildError:
            attrs = {}
        if attrs.get(GENERATED_BY) == call:
            reporter.label("info", f"dataset {dataset.name} already generated at {dest}")
            return dest
        reporter.label("info", f"dataset {dataset.name} at {dest} was not made by this generator call: "
                       "generating it again")
    module, _, name = dataset.generator.partition(":")
    try:
        func = importlib.import_module(module)
        for part in name.split("."):
            func = getattr(func, part)
    except (ImportError, AttributeError) as exc:
        raise DatasetBuildError(f"{what}: cannot import it: {exc}") from None
    scratch = dest.with_name(f".{dest.name}.building")
    shutil.rmtree(scratch, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        reporter.label("info", f"generating {dataset.name} with {dataset.generator}")
        building = scratch / dest.name
        func(building, **dataset.generator_options)
        _check_generated(building, what)
        root = zarr.open_group(str(building), mode="r+")
        root.attrs[GENERATED_BY] = call
        zarr.consolidate_metadata(str(building))
        attrs = dict(root.attrs)
        if dest.exists():
            shutil.rmtree(dest)
        building.rename(dest)
    except TypeError as exc:   # options the generator does not take
        raise DatasetBuildError(f"{what}: {exc} (generator_options: {dataset.generator_options})") from None
    except (OSError, ValueError) as exc:
        raise DatasetBuildError(f"{what}: {_error_line(str(exc))}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    reporter.label("info", f"generated {dataset.name}: {len(attrs.get('variables', [])) or 'no'} variables, "
                   f"{size / 2**20:.1f} MiB in {time.monotonic() - t0:.1f}s")
    return dest
