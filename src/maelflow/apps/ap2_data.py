"""AP2 data (4cast): short messages labelled rain / no rain, synthetic.

The real dataset (``maelstrom-a2``) is 1.6 million tweets labelled by whether ERA5 had rain where
and when they were sent (hourly total precipitation ``tp_h > 7e-6`` m). Text does not fit the anemoi
layout, so this dataset is a plain zarr group: ``text`` (fixed-width unicode), ``tp`` (the
synthetic precipitation behind each message, m) and ``label`` (1 where ``tp`` exceeds the
threshold), with the threshold and the rain rate in the attributes.

The messages come from templates. Whether a message mentions rain depends on the rain under it, but
not always: some rainy messages talk of something else, some dry ones say "no rain" (word order
matters), and some mention rain that was forecast but did not come. A model must read the text to
beat the rate of rain alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maelflow.apps.common import seeded_uuid, write_arrays

THRESHOLD = 7e-6   # m of precipitation in the hour, as MAELSTROM labelled the tweets
RAIN = ["rain", "raining", "drizzle", "pouring", "downpour", "showers", "umbrella", "soaked", "puddles",
        "wet", "thunderstorm", "rainy"]
DRY = ["sunny", "sunshine", "clear skies", "dry", "warm", "blue sky", "bright", "heat", "no clouds"]
NEGATED = ["no rain", "not raining", "zero rain", "no umbrella needed", "not a drop of rain"]
CITIES = ["oslo", "bergen", "hamburg", "berlin", "london", "paris", "madrid", "rome", "vienna", "zurich",
          "dublin", "lisbon", "warsaw", "prague", "copenhagen", "stockholm", "helsinki", "amsterdam"]
OPENERS = ["", "wow", "ugh", "honestly", "lol", "so", "finally", "again", "meh", "great"]
TEMPLATES = [
    "{opener} {weather} in {city} {tail}",
    "{opener} {weather} this {time} {tail}",
    "{city} {time}: {weather} {tail}",
    "walking to {place} and {weather} {tail}",
    "{opener} {time} in {city} is all {weather}",
]
NEUTRAL = [
    "{opener} stuck in traffic in {city} {tail}",
    "coffee at {place} this {time} {tail}",
    "{opener} meeting in {city} ran late",
    "{city} {time}: match tonight {tail}",
    "off to {place} {tail}",
]
FORECAST_ONLY = ["they said {rain} today in {city} but nothing", "forecast promised {rain} this {time}, still waiting"]
TIMES = ["morning", "afternoon", "evening", "night", "weekend"]
PLACES = ["work", "the station", "school", "the gym", "the market", "the office", "the park"]
TAILS = ["", "again", "as usual", "today", "right now", "all day", "!!", "#weather", "#commute"]
WIDTH = 96


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _fill(rng: np.random.Generator, template: str, weather: str) -> str:
    text = template.format(opener=_pick(rng, OPENERS), weather=weather, city=_pick(rng, CITIES),
                           tail=_pick(rng, TAILS), time=_pick(rng, TIMES), place=_pick(rng, PLACES),
                           rain=_pick(rng, RAIN))
    return " ".join(text.split())[:WIDTH]


def message(rng: np.random.Generator, raining: bool) -> str:
    """One message about the weather under it (or not)."""
    u = rng.random()
    if raining:
        if u < 0.75:
            return _fill(rng, _pick(rng, TEMPLATES), _pick(rng, RAIN))
        return _fill(rng, _pick(rng, NEUTRAL), "")
    if u < 0.45:
        return _fill(rng, _pick(rng, TEMPLATES), _pick(rng, DRY))
    if u < 0.60:
        return _fill(rng, _pick(rng, TEMPLATES), _pick(rng, NEGATED))
    if u < 0.68:
        return _fill(rng, _pick(rng, FORECAST_ONLY), "")
    return _fill(rng, _pick(rng, NEUTRAL), "")


def generate(path: Path | str, *, seed: int = 0, messages: int = 1600, rain_rate: float = 0.35) -> Path:
    """Write ``messages`` labelled messages to ``path``; about ``rain_rate`` of them rained on."""
    rng = np.random.default_rng(seed)
    n = int(messages)
    raining = rng.random(n) < rain_rate
    # precipitation in the hour: lognormal above the threshold where it rains, far below elsewhere
    tp = np.where(raining, THRESHOLD * np.exp(rng.normal(1.5, 1.0, n)) + THRESHOLD,
                  THRESHOLD * rng.random(n) * 0.5 * (rng.random(n) < 0.3))
    texts = np.array([message(rng, bool(r)) for r in raining], dtype=f"<U{WIDTH}")
    label = (tp > THRESHOLD).astype("int8")
    options = {"messages": n, "rain_rate": rain_rate}
    return write_arrays(path, {"text": texts, "tp": tp.astype("float32"), "label": label}, {
        "uuid": seeded_uuid("maelstrom-ap2", seed, options), "application": "AP2",
        "generator": "maelflow.apps.ap2_data:generate", "seed": seed, "generator_options": options,
        "threshold_m": THRESHOLD, "rain_fraction": float(label.mean()), "messages": n,
        "description": "synthetic short messages labelled by the precipitation under them (MAELSTROM AP2 layout)"})
