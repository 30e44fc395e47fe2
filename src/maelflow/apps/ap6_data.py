"""AP6 data (4cast): weather fields in planted regimes and the wind and solar power they produce, synthetic.

The real data are IFS fields over Europe (351 x 551 points, 10 levels, 2017-2020) and the production
of 45 NOTUS wind turbines (and solar parks), related through weather regimes. This generator makes
daily fields on a small European grid in one of four planted regimes (a Markov chain that tends to
stay in its regime): Z500 with the regime's pattern, the geostrophic 10 m wind that follows its
gradient, and a total cloud cover pattern of its own. Power is the capacity factor (0-1) of wind
farms at three grid points (a cut-in/rated power curve of the wind speed there) and of solar parks
at three others (the season's clear-sky factor dimmed by the cloud there).

Layout: anemoi for the fields (``z_500``, ``10u``, ``10v``, ``tcc``); beside them the arrays
``power`` (dates x 2: wind, solar) and ``regime`` (dates: the planted regime, for checking a
clustering), named in the attribute ``extra_arrays``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maelflow.apps.common import regular_grid, seeded_uuid, smooth_noise, write_anemoi

VARIABLES = ["z_500", "10u", "10v", "tcc"]
POWER = ["wind", "solar"]
REGIMES = 4


def power_curve(speed: np.ndarray, cut_in: float = 3.0, rated: float = 12.0, cut_out: float = 25.0) -> np.ndarray:
    """Capacity factor of a turbine at a wind speed (m/s)."""
    cf = np.clip((speed - cut_in) / (rated - cut_in), 0, 1) ** 3
    return np.where(speed > cut_out, 0.0, cf)


def generate(path: Path | str, *, seed: int = 0, grid: tuple[int, int] | list[int] = (32, 48), days: int = 360,
             persistence: float = 0.85, start: str = "2018-01-01T00:00:00") -> Path:
    """Write ``days`` daily fields on ``grid`` with their regimes and power to ``path``."""
    ny, nx = (int(g) for g in grid)
    n = int(days)
    rng = np.random.default_rng(seed)
    patterns = smooth_noise(rng, (REGIMES, ny, nx), 6.0)
    clouds = smooth_noise(rng, (REGIMES, ny, nx), 4.0)
    regime = np.zeros(n, dtype="int64")
    for t in range(1, n):
        regime[t] = regime[t - 1] if rng.random() < persistence else rng.integers(REGIMES)
    shape = (n, ny, nx)
    amplitude = 1 + 0.3 * rng.standard_normal(n)[:, None, None]
    z500 = 5600 + 120 * amplitude * patterns[regime] + 30 * smooth_noise(rng, shape, 3.0)
    # geostrophic wind from the Z500 gradient (grid units), and a little ageostrophic noise
    dzdy, dzdx = np.gradient(z500, axis=(1, 2))
    u10 = -0.25 * dzdy + 1.0 * rng.standard_normal(shape)
    v10 = 0.25 * dzdx + 1.0 * rng.standard_normal(shape)
    tcc = 1 / (1 + np.exp(-(2.0 * clouds[regime] + 0.8 * smooth_noise(rng, shape, 2.0))))
    wind_sites = [(ny // 4, nx // 3), (ny // 2, 2 * nx // 3), (3 * ny // 4, nx // 5)]
    solar_sites = [(ny // 3, nx // 2), (2 * ny // 3, nx // 4), (ny - 3, 3 * nx // 4)]
    speed = np.stack([np.hypot(u10[:, i, j], v10[:, i, j]) for i, j in wind_sites], axis=1)
    wind = power_curve(speed).mean(axis=1)
    day = np.arange(n)
    clear_sky = 0.55 - 0.35 * np.cos(2 * np.pi * day / 365.25)
    solar = clear_sky * np.stack([1 - 0.8 * tcc[:, i, j] for i, j in solar_sites], axis=1).mean(axis=1)
    data = np.stack([f.reshape(n, -1) for f in (z500, u10, v10, tcc)], axis=1)[:, :, None, :]
    lats, lons = regular_grid(ny, nx, north=70.0, south=35.0, west=-15.0, east=35.0)
    options = {"grid": [ny, nx], "days": n, "persistence": persistence, "start": start}
    return write_anemoi(path, data=data, variables=VARIABLES, latitudes=lats, longitudes=lons, start=start,
                        frequency_hours=24,
                        extra={"power": np.stack([wind, solar], axis=1).astype("float32"), "regime": regime},
                        attrs={"uuid": seeded_uuid("maelstrom-ap6", seed, options), "field_shape": [ny, nx],
                               "application": "AP6", "generator": "maelflow.apps.ap6_data:generate", "seed": seed,
                               "generator_options": options, "power_variables": POWER, "regimes": REGIMES,
                               "wind_sites": wind_sites, "solar_sites": solar_sites,
                               "description": "synthetic weather fields in planted regimes and the wind and solar "
                                              "capacity factors they give (MAELSTROM AP6 layout)"})
