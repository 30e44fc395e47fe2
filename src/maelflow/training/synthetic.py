"""A tiny synthetic ML-ready dataset in the anemoi zarr layout, made on this machine.

Used by the demo and the tests so that nothing needs MARS or the network. The layout follows
anemoi-datasets: a ``data`` array shaped (dates, variables, ensembles, grid points), latitudes,
longitudes, dates and per-variable statistics, with the metadata in the zarr attributes.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np


def make_synthetic(path: Path, *, dates: int = 112, lat: int = 18, lon: int = 36, seed: int = 0,
                   chunk_dates: int = 8) -> Path:
    import zarr

    path = Path(path)
    if (path / ".zattrs").exists():
        return path
    rng = np.random.default_rng(seed)
    lats = np.linspace(85, -85, lat)
    lons = np.arange(lon) * (360.0 / lon)
    la, lo = np.meshgrid(lats, lons, indexing="ij")
    t = np.arange(dates)[:, None, None]
    base = 280 - 30 * np.abs(np.sin(np.radians(la)))
    fields = {
        "2t": base + 5 * np.sin(2 * np.pi * t / 4 + np.radians(lo)) + rng.normal(0, 0.5, (dates, lat, lon)),
        "10u": 5 * np.cos(np.radians(la)) * np.cos(2 * np.pi * t / 28) + rng.normal(0, 0.5, (dates, lat, lon)),
        "10v": 3 * np.sin(np.radians(lo)) * np.sin(2 * np.pi * t / 28) + rng.normal(0, 0.5, (dates, lat, lon)),
        "msl": 101300 + 800 * np.sin(np.radians(2 * la + t * 3.0)) + rng.normal(0, 20, (dates, lat, lon)),
    }
    names = sorted(fields)
    data = np.stack([fields[n].reshape(dates, -1) for n in names], axis=1)[:, :, None, :].astype("float32")
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w")
    root.create_dataset("data", data=data, chunks=(chunk_dates, len(names), 1, data.shape[-1]))
    root.create_dataset("latitudes", data=la.ravel())
    root.create_dataset("longitudes", data=lo.ravel())
    start = np.datetime64("2020-01-01T00:00")
    root.create_dataset("dates", data=start + np.arange(dates) * np.timedelta64(6, "h"))
    flat = data[:, :, 0, :]
    root.create_dataset("mean", data=flat.mean(axis=(0, 2)))
    root.create_dataset("stdev", data=flat.std(axis=(0, 2)))
    root.create_dataset("minimum", data=flat.min(axis=(0, 2)))
    root.create_dataset("maximum", data=flat.max(axis=(0, 2)))
    root.attrs.update({
        "uuid": str(uuid.UUID(int=seed + 1)), "variables": names, "frequency": "6h",
        "start_date": "2020-01-01T00:00:00", "end_date": str(start + (dates - 1) * np.timedelta64(6, "h")),
        "field_shape": [lat, lon], "resolution": f"{180 / lat:g}", "ensemble_dimension": 1,
        "licence": "CC-BY-4.0", "attribution": "synthetic (maelflow)", "version": "0.22",
    })
    zarr.consolidate_metadata(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
