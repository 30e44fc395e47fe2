"""What the six MAELSTROM applications share on the data side: writing and reading their datasets,
held-out splits, and the ``skill_vs_baseline`` formula. numpy and zarr only: a dataset build task
imports this, and must not pay for importing the training stack (:mod:`maelflow.apps.nn`).

Why one place: each application (``ap1`` ... ``ap6``) is a small LightningModule and
LightningDataModule with a seeded generator of synthetic data; the dataset layout (anemoi's
``data`` array shaped dates x variables x ensemble members x grid points, with dates, coordinates,
per-variable statistics and attributes), the split into training and held-out data, and the way a
model is scored against its simple baseline must not differ between them, or their benchmark
figures and skill would not compare.

``skill_vs_baseline`` is ``1 - score(model) / score(baseline)`` for a negatively oriented score
(pinball loss, log loss, MSE, CRPS, MAE), both computed on the same held-out samples at the end of
each validation run, so the last value logged is the skill of the trained model. It is positive
exactly when the model beats the baseline: a check that the application learned something, not an
assumption.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STATISTICS = ("mean", "stdev", "minimum", "maximum")
SKILL_METRIC = "skill_vs_baseline"
UUID_NAMESPACE = uuid.UUID("6f1d5c7e-3b0a-4f57-9a43-6d2f0a6e1c15")


def seeded_uuid(kind: str, seed: int, options: dict[str, Any]) -> str:
    """The dataset's identity: the same generator, seed and options give the same UUID (and the
    same bytes), so a rebuilt dataset is recognised as the one already published."""
    text = json.dumps({"kind": kind, "seed": seed, "options": options}, sort_keys=True, default=str)
    return str(uuid.uuid5(UUID_NAMESPACE, text))


def regular_grid(n_lat: int, n_lon: int, north: float = 72.0, south: float = 36.0, west: float = -12.0,
                 east: float = 36.0) -> tuple[np.ndarray, np.ndarray]:
    """Latitudes and longitudes (flattened, row-major) of a regional regular grid of cell centres."""
    dlat = (north - south) / n_lat
    dlon = (east - west) / n_lon
    lats = north - dlat / 2 - dlat * np.arange(n_lat)
    lons = west + dlon / 2 + dlon * np.arange(n_lon)
    la, lo = np.meshgrid(lats, lons, indexing="ij")
    return la.ravel(), lo.ravel()


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Gaussian noise smoothed over the last two axes by a Gaussian of ``scale`` grid lengths
    (through the FFT, periodic), rescaled to unit standard deviation: weather-like random fields."""
    noise = rng.standard_normal(shape)
    ny, nx = shape[-2:]
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.fftfreq(nx)[None, :]
    kernel = np.exp(-2 * (np.pi * scale) ** 2 * (ky ** 2 + kx ** 2))
    out = np.real(np.fft.ifft2(np.fft.fft2(noise, axes=(-2, -1)) * kernel, axes=(-2, -1)))
    out -= out.mean(axis=(-2, -1), keepdims=True)
    return out / (out.std(axis=(-2, -1), keepdims=True) + 1e-12)


def write_anemoi(path: Path | str, *, data: np.ndarray, variables: list[str], latitudes: np.ndarray,
                 longitudes: np.ndarray, start: str, frequency_hours: int, attrs: dict[str, Any],
                 extra: dict[str, np.ndarray] | None = None, chunk_dates: int | None = None) -> Path:
    """Write ``data`` (dates, variables, ensemble members, grid points) as an anemoi-datasets zarr.

    The arrays and attributes anemoi-datasets' ``open_dataset`` reads: ``data``, ``dates``,
    ``latitudes``, ``longitudes``, the per-variable statistics over dates, members and grid points,
    and the attributes ``variables``, ``name_to_index``, ``frequency``, ``start_date``,
    ``end_date``, ``ensemble_dimension`` and ``uuid``. ``extra`` arrays (an application's targets
    that are not fields) are stored beside them, named in the attribute ``extra_arrays``.
    """
    import zarr

    path = Path(path)
    data = np.ascontiguousarray(data, dtype="float32")
    n_dates, n_vars, n_ens, n_grid = data.shape
    if len(variables) != n_vars:
        raise ValueError(f"{len(variables)} variable names for {n_vars} variables")
    if chunk_dates is None:  # about 1 MiB a chunk: few objects to publish and stage
        chunk_dates = max(1, min(n_dates, (1 << 20) // max(1, n_vars * n_ens * n_grid * 4)))
    step = np.timedelta64(frequency_hours, "h")
    first = np.datetime64(start, "s")
    dates = first + np.arange(n_dates) * step
    root = zarr.open_group(str(path), mode="w")
    root.create_dataset("data", data=data, chunks=(chunk_dates, n_vars, n_ens, n_grid))
    root.create_dataset("dates", data=dates)
    root.create_dataset("latitudes", data=np.asarray(latitudes, dtype="float64"))
    root.create_dataset("longitudes", data=np.asarray(longitudes, dtype="float64"))
    flat = data.transpose(1, 0, 2, 3).reshape(n_vars, -1).astype("float64")
    stats = {"mean": flat.mean(axis=1), "stdev": flat.std(axis=1), "minimum": flat.min(axis=1),
             "maximum": flat.max(axis=1)}
    for name in STATISTICS:
        root.create_dataset(name, data=stats[name])
    for name, values in (extra or {}).items():
        root.create_dataset(name, data=np.asarray(values))
    root.attrs.update({
        "variables": list(variables), "name_to_index": {v: i for i, v in enumerate(variables)},
        "frequency": f"{frequency_hours}h", "start_date": str(dates[0]), "end_date": str(dates[-1]),
        "ensemble_dimension": n_ens, "licence": "CC-BY-4.0", "attribution": "synthetic (maelflow)",
        "version": "0.22", "extra_arrays": sorted(extra or {}), **attrs,
    })
    zarr.consolidate_metadata(str(path))
    return path


def write_arrays(path: Path | str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> Path:
    """Write a plain zarr group of named arrays (for data anemoi's layout does not fit, e.g. text)."""
    import zarr

    root = zarr.open_group(str(path), mode="w")
    for name, values in arrays.items():
        root.create_dataset(name, data=np.asarray(values))
    root.attrs.update({"licence": "CC-BY-4.0", "attribution": "synthetic (maelflow)", **attrs})
    zarr.consolidate_metadata(str(path))
    return path


@dataclass
class Fields:
    """An anemoi-layout dataset read into memory (the applications' datasets are small)."""

    data: np.ndarray                      # (dates, variables, members, grid)
    variables: list[str]
    attrs: dict[str, Any]
    mean: np.ndarray
    stdev: np.ndarray
    latitudes: np.ndarray
    longitudes: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def index(self, name: str) -> int:
        try:
            return self.variables.index(name)
        except ValueError:
            raise KeyError(f"the dataset has no variable {name!r} (it has {', '.join(self.variables)})") from None

    def var(self, name: str) -> np.ndarray:
        """One variable, (dates, members, grid)."""
        return self.data[:, self.index(name)]

    @property
    def field_shape(self) -> tuple[int, int]:
        return tuple(self.attrs["field_shape"])  # type: ignore[return-value]


def read_anemoi(path: Path | str) -> Fields:
    import zarr

    root = zarr.open_group(str(path), mode="r")
    attrs = dict(root.attrs)
    extra = {name: np.asarray(root[name][:]) for name in attrs.get("extra_arrays", [])}
    return Fields(np.asarray(root["data"][:]), list(attrs["variables"]), attrs, np.asarray(root["mean"][:]),
                  np.asarray(root["stdev"][:]), np.asarray(root["latitudes"][:]), np.asarray(root["longitudes"][:]),
                  extra)


def read_arrays(path: Path | str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import zarr

    root = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(arr[:]) for name, arr in root.arrays()}, dict(root.attrs)


def held_out(n: int, val_fraction: float, minimum: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out indices: the last ``val_fraction`` of the samples (the latest dates),
    so that held-out data are never neighbours in time of the training data they resemble most."""
    n_val = min(n - 1, max(minimum, int(round(n * val_fraction))))
    return np.arange(n - n_val), np.arange(n - n_val, n)


def content_digest(path: Path | str) -> str:
    """SHA-256 over a dataset folder's files (names and bytes): what 'same seed, same dataset' means."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def skill(model_score: float, baseline_score: float) -> float:
    """``1 - model / baseline`` for negatively oriented scores; 0 when the baseline is perfect."""
    if baseline_score <= 0:
        return 0.0 if model_score >= baseline_score else 1.0
    return 1.0 - model_score / baseline_score
