"""Relay reporting: jobs write child commands to a spool, the relay replays them exactly once."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from maelflow.config.loader import load_experiment
from maelflow.demo import prepare_datasets
from maelflow.ecf import client_for
from maelflow.placeholders import placeholders_for
from maelflow.services import stack as stack_mod
from maelflow.suite.builder import spool_dir
from maelflow.suite.server import deploy, find, tree
from tests.conftest import PREBUILT, write_yaml
from tests.integration.suite_helpers import wait_for

pytestmark = pytest.mark.integration


def _spooled(directory: Path) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for f in directory.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            d = json.loads(line)
            counts[(d["task"], d["cmd"])] += 1
    return counts


def _server_log(ws, suite: str) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for log in ws.path("ecflow").glob("*.ecf.log"):
        for line in log.read_text(errors="replace").splitlines():
            if not line.startswith("MSG:"):  # ERR lines repeat a request whose answer was lost
                continue
            m = re.search(r" chd:(\w+) .*?(/" + suite + r"/\S+)\s*$", line) or \
                re.search(r" chd:(\w+) (/" + suite + r"/\S+)", line)
            if m:
                counts[(m.group(2), m.group(1))] += 1
    return counts


def test_relay_suite_completes_and_restart_loses_nothing(services, tmp_path, config_root):
    from maelflow.workspace import Workspace

    ws = Workspace(tmp_path / "ws_relay")
    services(ws, "ecflow", "s3", "mlflow", "catalogue", "relay")
    exp = write_yaml(config_root / "experiments" / "t_relay.yaml",
                     {"name": "t_relay", "sites": ["local"], "datasets": ["synth-small-numpy-10p0-2020-2020-6h-v1"], "trainings": ["tiny"]})
    rx = load_experiment(str(exp), [PREBUILT, "site.local.reporting=relay", "training.tiny.config.max_epochs=40"],
                         placeholders=placeholders_for(ws))
    prepare_datasets(rx)
    client = client_for(ws)
    deploy(rx, ws, client)
    relay = stack_mod.service(ws, "relay")
    # kill the relay (SIGKILL: no chance to tidy up) a few times while the suite runs
    for _ in range(3):
        time.sleep(3)
        pid = relay.pid()
        os.kill(pid, signal.SIGKILL)
        while relay.running():
            time.sleep(0.05)
        relay.up()
    wait_for(client, "/t_relay", {"complete"}, timeout=300)
    data = tree(client, "t_relay")
    train = find(data, "/t_relay/local/train/tiny/train")
    assert train["meters"]["epoch"]["value"] == 40
    assert train["events"]["checkpoint"] is True
    assert train["labels"]["mlflow"].startswith("run ")
    stage = find(data, "/t_relay/local/data/synth_small_numpy_10p0_2020_2020_6h_v1/stage")
    assert stage["meters"]["progress"]["value"] == 100
    spooled = _spooled(Path(spool_dir(rx, "local")))
    assert spooled[("/t_relay/local/train/tiny/train", "init")] == 1
    assert sum(spooled.values()) > 20
    logged = _server_log(ws, "t_relay")
    missing = {k: v for k, v in spooled.items() if logged.get(k, 0) < v}
    extra = {k: logged[k] for k, v in spooled.items() if logged.get(k, 0) > v}
    assert not missing, f"lost: {missing}"
    assert not extra, f"duplicated: {extra}"
