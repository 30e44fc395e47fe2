"""AP4 data (ETH): ensemble forecasts and the analysis they should have predicted, synthetic.

The real dataset (ENS-10: 10 members, 1998-2017, two forecasts a week, lead times 0/24/48 h, 720 x
361 points on 11 pressure levels, about 2.6 TB; a 10 GB mini version exists) is post-processed for
T850, Z500 and T2m. This generator makes ``members``-member 48 h forecasts of 2 m temperature,
T850 and Z500 on a small global grid, twice a week, and the verifying analysis.

The ensemble is what post-processing exists for: biased (a fixed pattern, and an error that depends
on the flow through Z500) and under-dispersive (its members spread less than its mean errs). The
layout is anemoi's with the ensemble dimension; the analysis ``an_2t`` is stored as one more
variable, the same in every member.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maelflow.apps.common import seeded_uuid, smooth_noise, write_anemoi

FORECAST = ["2t", "t_850", "z_500"]
TARGET = "an_2t"
VARIABLES = FORECAST + [TARGET]


def generate(path: Path | str, *, seed: int = 0, grid: tuple[int, int] | list[int] = (32, 64), forecasts: int = 104,
             members: int = 5, start: str = "2017-01-02T00:00:00") -> Path:
    """Write ``forecasts`` forecasts (every 3.5 days) of ``members`` members on a global ``grid``."""
    ny, nx = (int(g) for g in grid)
    n, m = int(forecasts), int(members)
    rng = np.random.default_rng(seed)
    lat = 90 - (np.arange(ny) + 0.5) * 180 / ny
    lon = (np.arange(nx) + 0.5) * 360 / nx
    la = np.radians(lat)[:, None]
    season = np.cos(2 * np.pi * np.arange(n) * 3.5 / 365.25)[:, None, None]
    shape = (n, ny, nx)
    # the analysis: climate by latitude and season, and weather: T850 anomalies that 2 m follows
    anomaly = 4 * smooth_noise(rng, shape, 3.0)
    an_t850 = 265 + 25 * np.cos(la) ** 2 + 8 * season * np.sin(la) + anomaly
    an_2t = an_t850 + 12 + 2 * smooth_noise(rng, shape, 1.5)
    an_z500 = 5000 + 700 * np.cos(la) ** 2 + 8 * anomaly + 40 * smooth_noise(rng, shape, 4.0)
    # the forecast: a fixed bias pattern, a flow-dependent bias, a common error, members that spread too little
    bias = 1.5 * np.cos(2 * la) * np.cos(np.radians(lon))[None, :]
    z_anom = (an_z500 - an_z500.mean(axis=0, keepdims=True)) / 100
    common = 1.5 * smooth_noise(rng, shape, 2.0)
    data = np.zeros((n, len(VARIABLES), m, ny * nx), dtype="float32")
    for k in range(m):
        spread = 0.5 * smooth_noise(rng, shape, 2.0)
        f_2t = an_2t + bias + 0.8 * z_anom + common + spread
        f_t850 = an_t850 + 0.5 * bias + 0.8 * common + 0.8 * spread
        f_z500 = an_z500 + 10 * common + 10 * smooth_noise(rng, shape, 2.0)
        for j, values in enumerate((f_2t, f_t850, f_z500, an_2t)):
            data[:, j, k, :] = values.reshape(n, -1)
    lats, lons = np.meshgrid(lat, lon, indexing="ij")
    options = {"grid": [ny, nx], "forecasts": n, "members": m, "start": start}
    return write_anemoi(path, data=data, variables=VARIABLES, latitudes=lats.ravel(), longitudes=lons.ravel(),
                        start=start, frequency_hours=84, attrs={
                            "uuid": seeded_uuid("maelstrom-ap4", seed, options), "field_shape": [ny, nx],
                            "application": "AP4", "generator": "maelflow.apps.ap4_data:generate", "seed": seed,
                            "generator_options": options, "lead_time_h": 48, "forecast_variables": FORECAST,
                            "target": TARGET,
                            "description": "synthetic biased, under-dispersive ensemble forecasts and their "
                                           "analysis (MAELSTROM AP4 / ENS-10 layout)"})
