"""A scheduler maelflow has never heard of runs a suite task: the test package's ``testsched``
(tests/plugins/maelflow-testsched, registered through the ``maelflow.schedulers`` entry point) on a
local site, through the real ecflow_server, with its own queue, ids and state files."""

from __future__ import annotations

import pytest
import yaml

from maelflow.config.loader import load_experiment
from maelflow.demo import prepare_datasets
from maelflow.config.names import node_name
from maelflow.ecf import client_for
from maelflow.sites.jobs import load_record
from maelflow.suite.server import deploy, find, tree
from tests.conftest import FAST_DATASET, PREBUILT, write_yaml
from tests.integration.suite_helpers import wait_for

pytestmark = pytest.mark.integration


def test_a_plugin_scheduler_runs_the_training_of_a_suite(stack, config_root):
    ws, _ = stack
    local = yaml.safe_load((config_root / "sites" / "local.yaml").read_text())
    write_yaml(config_root / "sites" / "atsite.yaml", {
        **local, "name": "atsite", "scheduler": "testsched", "description": "local site, at-style queue",
        "paths": {"root": "{workspace}/sites/atsite", "datasets": "{workspace}/sites/atsite/datasets",
                  "outputs": "{workspace}/sites/atsite/outputs"}})
    exp = write_yaml(config_root / "experiments" / "t_plugin.yaml", {
        "name": "t_plugin", "sites": ["atsite"], "datasets": [FAST_DATASET], "trainings": ["tiny"]})
    rx = load_experiment(str(exp), [PREBUILT], placeholders={"workspace": str(ws.root)})
    assert rx.sites["atsite"].scheduler == "testsched"
    prepare_datasets(rx)
    client = client_for(ws)
    built = deploy(rx, ws, client)
    node = wait_for(client, "/t_plugin", {"complete", "aborted"}, timeout=240)
    assert node["state"] == "complete", node

    data = tree(client, "t_plugin")
    train = find(data, "/t_plugin/atsite/train/tiny/train")
    assert train["meters"]["epoch"]["value"] == 3 and train["events"]["checkpoint"] is True
    # ... submitted to the plugin's queue, which ran it to the end and kept its state
    jobs = built.out_dir / "jobs" / "t_plugin" / "atsite"
    record = load_record(jobs / "train" / "tiny" / "train.job1")
    assert record is not None and record.kind == "testsched", record
    from maelflow_testsched.__main__ import spool

    queued = spool() / record.job_id
    assert (queued / "job").read_text().strip() == str(jobs / "train" / "tiny" / "train.job1")
    assert (queued / "state").read_text().split() == ["done", "0"]
    # the login-node task of the same site ran as a plain process, not through the plugin
    stage = load_record(jobs / "data" / node_name(FAST_DATASET) / "stage.job1")
    assert stage is not None and stage.kind == "local", stage
