"""AP5 data (JSC): coarse 2 m temperature, fine orography and the fine 2 m temperature, synthetic.

The real Tier-1 dataset downscales IFS 2 m temperature from 0.8 to 0.1 degree (96 x 128 target
points, about 300 MB); Tier-2 goes from ERA5 to COSMO-REA6 with 15 predictors (94,052 samples,
62 GB). This generator makes the Tier-1 problem small: a fine-grid temperature that is a smooth
large-scale field plus the lapse rate times a fine orography, and the same field averaged over
``factor`` x ``factor`` blocks, the coarse model's view of it. A model that knows the orography can
put back what the block average lost.

Layout (anemoi, one fine grid): ``2t`` (the fine target, K), ``2t_coarse`` (the block averages,
constant over each block, K) and ``orography`` (m). The coarsening factor is in the attributes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maelflow.apps.common import regular_grid, seeded_uuid, smooth_noise, write_anemoi

VARIABLES = ["2t", "2t_coarse", "orography"]
LAPSE = 0.0065


def block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Means over ``factor`` x ``factor`` blocks of the last two axes, repeated back to their size."""
    *lead, ny, nx = a.shape
    blocks = a.reshape(*lead, ny // factor, factor, nx // factor, factor).mean(axis=(-3, -1))
    return np.repeat(np.repeat(blocks, factor, axis=-2), factor, axis=-1)


def generate(path: Path | str, *, seed: int = 0, grid: tuple[int, int] | list[int] = (96, 128), factor: int = 8,
             times: int = 64, start: str = "2020-01-01T00:00:00") -> Path:
    """Write ``times`` daily fields on a fine ``grid`` (divisible by ``factor``) to ``path``."""
    ny, nx = (int(g) for g in grid)
    factor = int(factor)
    if ny % factor or nx % factor:
        raise ValueError(f"grid {ny}x{nx} is not divisible by the coarsening factor {factor}")
    n = int(times)
    rng = np.random.default_rng(seed)
    orography = np.clip(900 * smooth_noise(rng, (ny, nx), 1.2) + 600 * smooth_noise(rng, (ny, nx), 4.0) + 500,
                        0, None)
    shape = (n, ny, nx)
    large = (283 + 6 * smooth_noise(rng, shape, 10.0)
             + 3 * np.linspace(-1, 1, ny)[None, :, None] * np.cos(2 * np.pi * np.arange(n) / 30)[:, None, None])
    fine = large - LAPSE * orography + 0.15 * rng.standard_normal(shape)
    coarse = block_mean(fine, factor)
    data = np.stack([fine, coarse, np.broadcast_to(orography, shape)], axis=1).reshape(n, 3, 1, ny * nx)
    lats, lons = regular_grid(ny, nx, north=55.0, south=45.4, west=3.0, east=15.8)
    options = {"grid": [ny, nx], "factor": factor, "times": n, "start": start}
    return write_anemoi(path, data=data, variables=VARIABLES, latitudes=lats, longitudes=lons, start=start,
                        frequency_hours=24, attrs={
                            "uuid": seeded_uuid("maelstrom-ap5", seed, options), "field_shape": [ny, nx],
                            "application": "AP5", "generator": "maelflow.apps.ap5_data:generate", "seed": seed,
                            "generator_options": options, "coarsening_factor": factor, "target": "2t",
                            "description": "synthetic fine 2 m temperature, its block averages and the fine "
                                           "orography (MAELSTROM AP5 Tier-1 layout)"})
