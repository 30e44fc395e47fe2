"""AP3 data (ECMWF): atmospheric columns and their radiative heating rates, synthetic.

The real dataset (``climetlab-maelstrom-radiation``, about 2 TB) holds IFS columns on 137 levels
with the ecRad fluxes and heating rates, 67,840 columns a file; the heating rate of a layer is
``hr = -g/cp * 86400 * dF/dp`` (K/day) from the net flux across it. This generator makes columns on
``levels`` layers (20 by default) over a regional grid at a few times of day, with fluxes from a
toy two-stream scheme:

- shortwave: the direct beam attenuated by Beer-Lambert through the absorber (and clouds) along
  the slant path ``1/cos(solar zenith angle)``, reflected by the surface albedo and attenuated again
  on its way up (diffusivity 1.66);
- longwave: each layer cools in proportion to its emission, ``T**4`` times its emissivity.

Layout (anemoi): grid points are columns; the per-level variables are named ``t_<k>`` (K),
``q_<k>`` (absorber, kg/kg) and ``cc_<k>`` (cloud fraction) and ``hr_<k>`` (K/day, the targets) for k = 1 (top) ... levels, and
``cos_sza``, ``albedo`` and ``skt`` (surface temperature, K) are per column.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maelflow.apps.common import regular_grid, seeded_uuid, smooth_noise, write_anemoi

G, CP = 9.80665, 1004.0
S0 = 1361.0                 # W m-2
KAPPA = 0.08                # m2 kg-1, absorber mass extinction
KAPPA_CLOUD = 0.6           # absorption optical depth of a fully cloudy layer
KAPPA_LW = 0.6              # longwave absorptivity per kg m-2 of absorber


PROFILES = ("t", "q", "cc")          # inputs per level
SCALARS = ("cos_sza", "albedo", "skt")  # inputs per column
TARGET = "hr"


def level_names(name: str, levels: int) -> list[str]:
    return [f"{name}_{k}" for k in range(1, levels + 1)]


def column_variables(levels: int) -> list[str]:
    return [v for p in PROFILES for v in level_names(p, levels)] + list(SCALARS) + level_names(TARGET, levels)


def half_levels(levels: int) -> np.ndarray:
    """Pressure (Pa) at the layer interfaces, from the top (10 Pa) to the surface (100000 Pa)."""
    return 10 + (1e5 - 10) * np.linspace(0, 1, levels + 1) ** 1.6


def heating_rates(t: np.ndarray, q: np.ndarray, cloud: np.ndarray, mu: np.ndarray, albedo: np.ndarray,
                  p_half: np.ndarray) -> np.ndarray:
    """Heating rates (K/day) of columns: ``t``, ``q``, ``cloud`` (columns, levels), ``mu`` and
    ``albedo`` (columns,), interfaces ``p_half`` (levels + 1,)."""
    dp = np.diff(p_half)[None, :]                                        # Pa
    dtau = KAPPA * q * dp / G + KAPPA_CLOUD * cloud                      # layer optical depth
    tau = np.concatenate([np.zeros((len(t), 1)), np.cumsum(dtau, axis=1)], axis=1)   # at interfaces
    sun = mu[:, None] > 0
    mu_c = np.where(sun, np.maximum(mu[:, None], 1e-3), 1.0)
    down = np.where(sun, S0 * mu_c * np.exp(-tau / mu_c), 0.0)          # direct beam, interfaces
    up_sfc = albedo[:, None] * down[:, -1:]
    up = up_sfc * np.exp(-1.66 * (tau[:, -1:] - tau))                    # reflected, attenuated upwards
    net = down - up                                                      # downward net flux
    sw = G / CP * 86400 * (net[:, :-1] - net[:, 1:]) / dp                # absorbed in each layer
    emissivity = 1 - np.exp(-KAPPA_LW * q * dp / G * 50 - 2 * cloud)
    lw = -1.8 * (t / 255.0) ** 4 * emissivity * 2
    return sw + lw


def generate(path: Path | str, *, seed: int = 0, grid: tuple[int, int] | list[int] = (16, 32), times: int = 8,
             levels: int = 20, start: str = "2021-06-01T09:00:00") -> Path:
    """Write ``times`` 3-hourly steps of ``grid`` columns on ``levels`` layers to ``path``."""
    ny, nx = (int(g) for g in grid)
    levels = int(levels)
    rng = np.random.default_rng(seed)
    lats, lons = regular_grid(ny, nx, north=70.0, south=-10.0, west=-60.0, east=100.0)
    ncol = ny * nx
    p_half = half_levels(levels)
    p_full = 0.5 * (p_half[1:] + p_half[:-1])
    z = -7000 * np.log(p_full / 1e5)                                     # m, scale height 7 km
    albedo = np.clip(0.08 + 0.25 * (smooth_noise(rng, (ny, nx), 3.0) > 0.3) + 0.5 * (np.abs(lats.reshape(ny, nx))
                     > 60) * (smooth_noise(rng, (ny, nx), 2.0) > 0), 0.05, 0.85).ravel()
    data = np.zeros((times, 4 * levels + 3, 1, ncol))
    declination = np.radians(20.0)
    first_hour = int(np.datetime64(start, "h").astype("int64") % 24)
    for i in range(times):
        hour = (first_hour + 3 * i) % 24
        skt = (300 - 30 * np.sin(np.radians(np.abs(lats))) ** 2 + 5 * smooth_noise(rng, (ny, nx), 3.0).ravel())
        lapse = 0.0065 * (1 + 0.15 * rng.standard_normal(ncol))
        t = np.maximum(skt[:, None] - lapse[:, None] * z[None, :], 205 + 3 * rng.standard_normal((ncol, 1)))
        scale = np.exp(0.5 * smooth_noise(rng, (ny, nx), 2.0).ravel())
        q = 0.012 * scale[:, None] * (p_full[None, :] / 1e5) ** 3 * (skt[:, None] / 300) ** 6
        cloud = np.zeros((ncol, levels))
        cloudy = rng.random(ncol) < 0.4
        base = rng.integers(levels // 3, levels - 2, ncol)
        depth = rng.integers(1, 4, ncol)
        for k in range(levels):
            cloud[:, k] = cloudy * (k >= base) * (k < base + depth) * rng.uniform(0.2, 1.0, ncol)
        hour_angle = np.radians(15 * (hour - 12) + lons)
        lat_r = np.radians(lats)
        mu = np.sin(lat_r) * np.sin(declination) + np.cos(lat_r) * np.cos(declination) * np.cos(hour_angle)
        mu = np.maximum(mu, 0.0)
        hr = heating_rates(t, q, cloud, mu, albedo, p_half)
        data[i, :, 0, :] = np.concatenate([t.T, q.T, cloud.T, mu[None], albedo[None], skt[None], hr.T],
                                            axis=0)
    options = {"grid": [ny, nx], "times": times, "levels": levels, "start": start}
    return write_anemoi(path, data=data, variables=column_variables(levels), latitudes=lats, longitudes=lons,
                        start=start, frequency_hours=3, attrs={
                            "uuid": seeded_uuid("maelstrom-ap3", seed, options), "field_shape": [ny, nx],
                            "application": "AP3", "generator": "maelflow.apps.ap3_data:generate", "seed": seed,
                            "generator_options": options, "levels": levels,
                            "pressure_half_levels_pa": p_half.tolist(),
                            "description": "synthetic atmospheric columns and their toy two-stream heating rates "
                                           "(MAELSTROM AP3 layout)"})
