"""AP1 data (MET Norway): NWP 2 m temperature forecasts and the observation-corrected truth, synthetic.

The real dataset (``metno/maelstrom-yr``: 1 km hourly 2 m temperature over the Nordics, 58 h ahead,
1799 x 2321 points, about 5 TB) pairs NWP predictors with an analysis that assimilates citizen
observations. This generator makes the same shape of problem on a small regional grid: ten NWP
predictors per valid time and the "observed" 2 m temperature, in the anemoi layout.

Forecasts start every 6 hours with lead times 1 to 6 h, so the valid times are hourly and each date
is one (forecast, lead time) pair; ``lead_time`` is a predictor. What the NWP gets wrong, and a
model can learn: the temperature error of its smooth model orography (lapse rate times the
difference to the real altitude), a cloud-dependent bias over land, and an error that grows with
lead time (what the 0.1 and 0.9 quantiles must capture).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maelflow.apps.common import regular_grid, seeded_uuid, smooth_noise, write_anemoi

PREDICTORS = ["nwp_2t", "nwp_10u", "nwp_10v", "nwp_tcc", "nwp_altitude", "altitude", "land_sea_mask",
              "lead_time", "cos_hour", "sin_hour"]
TARGET = "obs_2t"
VARIABLES = PREDICTORS + [TARGET]
LAPSE = 0.0065  # K per m
LEAD_TIMES = 6


def generate(path: Path | str, *, seed: int = 0, grid: tuple[int, int] | list[int] = (64, 64),
             forecasts: int = 16, start: str = "2021-01-01T00:00:00") -> Path:
    """Write the dataset to ``path``: ``forecasts`` x 6 hourly valid times on a ``grid`` of points."""
    ny, nx = (int(g) for g in grid)
    rng = np.random.default_rng(seed)
    n = int(forecasts) * LEAD_TIMES
    shape = (n, ny, nx)
    # static fields: real altitude with fine hills, the NWP's smoother version of it, land and sea
    relief = 700 * smooth_noise(rng, (ny, nx), 1.5) + 500 * smooth_noise(rng, (ny, nx), 5.0) + 250
    land = relief > 0
    altitude = np.where(land, relief, 0.0)
    nwp_altitude = np.clip(np.real(np.fft.ifft2(np.fft.fft2(altitude) * _lowpass(ny, nx, 4.0))), 0, None)
    lead = np.tile(np.arange(1, LEAD_TIMES + 1), forecasts).astype(float)            # 1..6 h
    hour = (np.arange(n) + 1) % 24                                                    # valid hour (UTC)
    diurnal = np.cos(2 * np.pi * (hour - 15) / 24)[:, None, None]
    # the truth: synoptic anomalies, a diurnal cycle over land, the lapse rate over real altitude
    truth = (272 + 6 * smooth_noise(rng, shape, 6.0) + 4 * diurnal * land - LAPSE * altitude)
    u10 = 6 * smooth_noise(rng, shape, 5.0)
    v10 = 6 * smooth_noise(rng, shape, 5.0)
    tcc = 1 / (1 + np.exp(-2.5 * smooth_noise(rng, shape, 3.0)))
    # the NWP: smooth orography (no lapse error), too warm under clouds at night over land, and an
    # error that grows with lead time
    lead3 = lead[:, None, None]
    nwp = (truth + LAPSE * (altitude - nwp_altitude) + 2.0 * land * (tcc - 0.5) * (1 - diurnal)
           + 0.35 * lead3 * smooth_noise(rng, shape, 2.0))
    obs = truth + 0.2 * rng.standard_normal(shape)
    fields = {
        "nwp_2t": nwp, "nwp_10u": u10, "nwp_10v": v10, "nwp_tcc": tcc,
        "nwp_altitude": np.broadcast_to(nwp_altitude, shape), "altitude": np.broadcast_to(altitude, shape),
        "land_sea_mask": np.broadcast_to(land.astype(float), shape), "lead_time": np.broadcast_to(lead3, shape),
        "cos_hour": np.broadcast_to(np.cos(2 * np.pi * hour / 24)[:, None, None], shape),
        "sin_hour": np.broadcast_to(np.sin(2 * np.pi * hour / 24)[:, None, None], shape),
        TARGET: obs,
    }
    data = np.stack([fields[v].reshape(n, -1) for v in VARIABLES], axis=1)[:, :, None, :]
    lats, lons = regular_grid(ny, nx, north=71.0, south=55.0, west=4.0, east=31.0)
    options = {"grid": [ny, nx], "forecasts": int(forecasts), "start": start}
    return write_anemoi(path, data=data, variables=VARIABLES, latitudes=lats, longitudes=lons, start=start,
                        frequency_hours=1, attrs={
                            "uuid": seeded_uuid("maelstrom-ap1", seed, options), "field_shape": [ny, nx],
                            "application": "AP1", "generator": "maelflow.apps.ap1_data:generate",
                            "seed": seed, "generator_options": options, "predictors": PREDICTORS,
                            "target": TARGET, "lead_times_h": list(range(1, LEAD_TIMES + 1)),
                            "description": "synthetic NWP 2 m temperature predictors and observation-corrected "
                                           "truth (MAELSTROM AP1 layout)"})


def _lowpass(ny: int, nx: int, scale: float) -> np.ndarray:
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.fftfreq(nx)[None, :]
    return np.exp(-2 * (np.pi * scale) ** 2 * (ky ** 2 + kx ** 2))
