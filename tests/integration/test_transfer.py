"""Dataset transfer against the real S3 server process (rclone serve s3), the loopback HPC site
(sshd + SLURM, user maelhpc) and the catalogue service: publish, stage (here, on the login node
over SSH, pushed by rsync over SSH), verify, resume after SIGKILL, corruption, credentials, the suite, the worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from maelflow.cli.main import cli
from maelflow.services import stack as stack_mod
from maelflow.workspace import Workspace
from maelflow.datasets import catalogue_hook as hook
from maelflow.datasets.settings import ewc_settings, load_site, open_store
from maelflow_sandbox import hpc
from maelflow_transfer.errors import ChecksumMismatch, CredentialsError, NotPublished, SourceChanged
from maelflow_transfer.manifest import MANIFEST_NAME
from maelflow_transfer.publish import publish
from maelflow_transfer.retry import Backoff
from maelflow.datasets.stage import stage_dataset
from maelflow_transfer.stage import stage
from maelflow_transfer.trees import LocalTree
from tests.conftest import FAST_DATASET, write_yaml
from tests.integration.suite_helpers import wait_for

pytestmark = pytest.mark.integration
MAELFLOW = str(Path(sys.executable).with_name("maelflow"))
RSYNC_TMP = re.compile(r"\..+\.[A-Za-z0-9]{6}")      # rsync's file being received: .<name>.<6 random>


def make_zarr(path: Path, chunks: int, size: int) -> Path:
    """A zarr-shaped folder of ``chunks`` random chunk files of ``size`` bytes."""
    (path / "data").mkdir(parents=True)
    (path / ".zgroup").write_text('{"zarr_format": 2}')
    (path / "data" / ".zarray").write_text(json.dumps({"chunks": [1, size], "shape": [chunks, size]}))
    for i in range(chunks):
        (path / "data" / f"{i}.0").write_bytes(os.urandom(size))
    return path


@pytest.fixture(scope="module")
def tstack(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("transfer") / "ws")
    from maelflow.workspace import catalogue_paths
    from maelflow_registry.config import load_settings, save_settings

    paths = catalogue_paths(ws)
    settings = load_settings(paths)
    settings.dataset_naming = "relaxed"     # test datasets are not named by the anemoi convention
    save_settings(paths, settings)
    extra = ["hpc", "catalogue"]
    try:
        stack_mod.up(ws, names=["ecflow", "s3", "relay"], extra=extra)   # relay: localhpc jobs report through it
        yield ws
    finally:
        stack_mod.down(ws)
        hpc.forget(ws)


def _cli(ws, *args):
    res = CliRunner().invoke(cli, list(args), env={"MAELFLOW_WORKSPACE": str(ws.root)}, catch_exceptions=False)
    return res


def _published(ws, tmp_path, name: str, chunks: int = 40, size: int = 20_000) -> Path:
    src = make_zarr(tmp_path / f"{name}.zarr", chunks, size)
    res = _cli(ws, "transfer", "publish", str(src), "--dataset", name)
    assert res.exit_code == 0, res.output
    return src


def _kill_midway(args: list[str], env: dict, dest: Path, partial: Path, objects: int,
                 settle: float = 0.0) -> list[Path]:
    """Run ``maelflow transfer stage ARGS``, SIGKILL it once ``objects`` chunks are in the partial
    folder (checking all along that the destination never appears); the complete files left."""
    proc = subprocess.Popen([MAELFLOW, "transfer", "stage", *args, "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            assert not dest.exists(), "the destination became visible before the stage finished"
            data = partial / "data"
            if data.is_dir() and sum(1 for _ in data.glob("*.0")) >= objects:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(settle)
    assert not dest.exists()
    return [p for p in partial.rglob("*") if p.is_file() and not p.name.endswith(".part")
            and not RSYNC_TMP.fullmatch(p.name) and not p.name.startswith((".maelflow-journal", ".maelflow-lock"))]


def _catalogue(ws):
    return hook.client(ws)


def test_publish_stage_verify_here(tstack, tmp_path):
    ws = tstack
    _published(ws, tmp_path, "tr-local")
    dest = tmp_path / "site" / "tr-local.zarr"
    res = _cli(ws, "transfer", "stage", "tr-local", "--dest", str(dest))
    assert res.exit_code == 0, res.output
    assert "42 objects (42 copied" in res.output
    assert (dest / MANIFEST_NAME).is_file() and (dest / "data" / "7.0").stat().st_size == 20_000
    res = _cli(ws, "transfer", "verify", "tr-local", "--dest", str(dest))
    assert res.exit_code == 0 and "all 42 objects match" in res.output, res.output
    # a finished stage does nothing
    res = _cli(ws, "transfer", "stage", "tr-local", "--dest", str(dest))
    assert "0 copied, 42 already there" in res.output, res.output
    # publishing the same folder again uploads nothing; other content under the same name is refused
    res = _cli(ws, "transfer", "publish", str(tmp_path / "tr-local.zarr"), "--dataset", "tr-local")
    assert "0 uploaded" in res.output or "(0 copied" in res.output, res.output
    (tmp_path / "tr-local.zarr" / "data" / "0.0").write_bytes(b"new")
    res = _cli(ws, "transfer", "publish", str(tmp_path / "tr-local.zarr"), "--dataset", "tr-local")
    assert res.exit_code == 1 and "already published" in res.output and "--replace" in res.output
    # a damaged staged copy is named by verify
    (dest / "data" / "3.0").write_bytes(b"x" * 20_000)
    res = _cli(ws, "transfer", "verify", "tr-local", "--dest", str(dest))
    assert res.exit_code == 1 and "data/3.0" in res.output


def test_killed_stage_resumes_and_is_never_visible(tstack, tmp_path):
    ws = tstack
    n = 300
    _published(ws, tmp_path, "tr-kill", chunks=n - 2, size=16_384)
    dest = tmp_path / "site" / "tr-kill.zarr"
    partial = dest.with_name(".tr-kill.zarr.partial")
    env = {**os.environ, "MAELFLOW_WORKSPACE": str(ws.root)}
    complete = _kill_midway(["tr-kill", "--dest", str(dest), "--workers", "4", "--max-rate", str(1_500_000)],
                            env, dest, partial, n // 2)
    assert n // 2 <= len(complete) < n
    settings = ewc_settings(ws)
    store = open_store(settings, "datasets/tr-kill.zarr")
    seen = []
    res = stage(store, LocalTree(dest), "tr-kill", workers=4,
                progress=__import__("maelflow_transfer.progress", fromlist=["Progress"]).Progress([seen.append]))
    assert res.copied == n - len(complete), (res, len(complete))
    assert res.already == len(complete)
    assert seen[-1].final and seen[-1].bytes_done == seen[-1].bytes_total
    assert _cli(ws, "transfer", "verify", "tr-kill", "--dest", str(dest)).exit_code == 0
    assert not partial.exists()


def test_corrupt_object_in_the_store_is_never_staged(tstack, tmp_path):
    ws = tstack
    _published(ws, tmp_path, "tr-corrupt", chunks=10)
    data_dir = Path(stack_mod.discover(ws, "s3").extra["data_dir"])
    obj = data_dir / "ewc" / "datasets" / "tr-corrupt.zarr" / "data" / "4.0"
    obj.write_bytes(b"\0" * obj.stat().st_size)          # same size, other bytes: bit rot on the store
    store = open_store(ewc_settings(ws), "datasets/tr-corrupt.zarr")
    store.backoff = Backoff(attempts=3, base=0.01, cap=0.05)
    dest = tmp_path / "site" / "tr-corrupt.zarr"
    with pytest.raises(ChecksumMismatch) as err:
        stage(store, LocalTree(dest), "tr-corrupt", workers=4, retries=2)
    assert "data/4.0" in str(err.value) and "corrupt" in str(err.value)
    assert not dest.exists()
    res = _cli(ws, "transfer", "stage", "tr-corrupt", "--dest", str(dest))
    assert res.exit_code == 1 and "data/4.0" in res.output and not dest.exists()
    # pushed to a site: the pull into the push's spool refuses it (fetched again as often as a
    # pull would), then the same error; nothing of it reaches the site, whose folder stays invisible
    site = load_site("localhpc", ws)
    res = _cli(ws, "transfer", "stage", "tr-corrupt", "--site", "localhpc", "-o", "internet.login=false")
    assert res.exit_code == 1 and "data/4.0" in res.output and "after 4 reads" in res.output, res.output
    assert not Path(f"{site.paths.datasets}/tr-corrupt.zarr").exists()
    partial = Path(f"{site.paths.datasets}/.tr-corrupt.zarr.partial")
    assert not (partial / "data" / "4.0").exists()


def test_source_changed_while_publishing_is_not_published(tstack, tmp_path):
    ws = tstack
    src = make_zarr(tmp_path / "tr-changing.zarr", 12, 10_000)
    store = open_store(ewc_settings(ws), "datasets/tr-changing.zarr")

    def rewrite(manifest) -> None:      # after the scan, before the upload: a writer still at work
        (src / "data" / "5.0").write_bytes(os.urandom(10_000))
    with pytest.raises(SourceChanged, match="data/5.0"):
        publish(src, "tr-changing", store, on_manifest=rewrite)
    assert store.read_manifest() is None
    with pytest.raises(NotPublished, match="not published"):
        stage(store, LocalTree(tmp_path / "d.zarr"), "tr-changing")
    # once the source is still, the publish goes through
    assert publish(src, "tr-changing", store).objects == 14


def test_wrong_credentials_and_missing_dataset(tstack, tmp_path):
    ws = tstack
    bad = {**ewc_settings(ws), "secret_key": "not-the-secret"}
    creds = tmp_path / "ewc.json"
    creds.write_text(json.dumps(bad))
    res = _cli(ws, "transfer", "stage", "tr-local", "--dest", str(tmp_path / "x.zarr"), "--credentials", str(creds))
    assert res.exit_code == 1 and "refused the credentials" in res.output, res.output
    with pytest.raises(CredentialsError):
        stage_dataset(ws, "tr-local", dest=str(tmp_path / "x.zarr"), credentials=str(creds))
    res = _cli(ws, "transfer", "stage", "no-such-dataset", "--dest", str(tmp_path / "y.zarr"))
    assert res.exit_code == 1 and "is not published" in res.output
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_push_and_login_pull_on_the_hpc_site(tstack, tmp_path):
    ws = tstack
    _published(ws, tmp_path, "tr-hpc", chunks=60, size=50_000)
    site = load_site("localhpc", ws)
    # the login node cannot reach S3: pulled here, pushed by rsync over the site's SSH master
    res = _cli(ws, "transfer", "stage", "tr-hpc", "--site", "localhpc", "-o", "internet.login=false")
    assert res.exit_code == 0 and "(push)" in res.output, res.output
    pushed = f"{site.paths.datasets}/tr-hpc.zarr"
    res = _cli(ws, "transfer", "verify", "tr-hpc", "--site", "localhpc")
    assert res.exit_code == 0 and "all 62 objects match" in res.output, res.output
    info = hpc.connection_info(ws)
    owner = subprocess.run(["ssh", *info["ssh_options"], f"{info['user']}@127.0.0.1",
                            f"stat -c %U {pushed}/data/1.0; ls -a {site.paths.datasets}"],
                           capture_output=True, text=True, timeout=30).stdout
    assert owner.split()[0] == "maelhpc" and ".tr-hpc.zarr.partial" not in owner
    # the login node reaches S3: the pull runs there, progress streamed back over the SSH session
    dest = f"{site.paths.root}/elsewhere/tr-hpc.zarr"
    res = _cli(ws, "transfer", "stage", "tr-hpc", "--site", "localhpc", "--dest", dest, "--no-register")
    assert res.exit_code == 0 and "(login)" in res.output and "62 objects (62 copied" in res.output, res.output
    assert _cli(ws, "transfer", "verify", "tr-hpc", "--site", "localhpc", "--dest", dest).exit_code == 0
    res = _cli(ws, "transfer", "stage", "tr-hpc", "--site", "localhpc", "--dest", dest, "--no-register")
    assert "0 copied, 62 already there" in res.output, res.output


def test_suite_publishes_stages_and_registers(tstack, config_root):
    from maelflow.config.loader import load_experiment
    from maelflow.demo import prepare_datasets
    from maelflow.ecf import client_for
    from maelflow.placeholders import placeholders_for
    from maelflow.suite.server import deploy, find, tree

    ws = tstack
    cat = _catalogue(ws)
    exp = write_yaml(config_root / "experiments" / "t_data.yaml",
                     {"name": "t_data", "sites": ["local", "localhpc"], "datasets": [FAST_DATASET], "trainings": []})
    # the login node of localhpc cannot reach S3 here: the suite pushes by rsync over SSH from the server side
    rx = load_experiment(str(exp), ["site.localhpc.internet.login=false"], placeholders=placeholders_for(ws))
    prepare_datasets(rx)
    client = client_for(ws)
    deploy(rx, ws, client)
    wait_for(client, "/t_data", {"complete"}, timeout=150)
    data = tree(client, "t_data")
    for site in ("local", "localhpc"):
        node = find(data, f"/t_data/{site}/data/synth_small_numpy_10p0_2020_2020_6h_v1/stage")
        assert node["meters"]["progress"]["value"] == 100 and node["events"]["verified"] is True
        assert "MiB/s" in node["labels"]["rate"]
        locate = find(data, f"/t_data/{site}/data/synth_small_numpy_10p0_2020_2020_6h_v1/locate")  # beside the server, after the stage
        assert "catalogue: synth-small-numpy-10p0-2020-2020-6h-v1 located at " + site in locate["labels"]["info"], locate["labels"]
    record = cat.get("datasets", FAST_DATASET)
    assert record["locations"]["localhpc"]["path"] == f"{rx.sites['localhpc'].paths.datasets}/{FAST_DATASET}.zarr"
    assert record["locations"]["local"]["path"].endswith(f"/{FAST_DATASET}.zarr")
    assert record["locations"]["ewc"]["path"] == f"s3://ewc/datasets/{FAST_DATASET}.zarr"
    res = _cli(ws, "transfer", "verify", FAST_DATASET, "--site", "localhpc")
    assert res.exit_code == 0, res.output

    # localhpc as configured: its login node reaches S3, the stage task runs there and pulls
    exp = write_yaml(config_root / "experiments" / "t_login.yaml",
                     {"name": "t_login", "sites": ["localhpc"], "datasets": [FAST_DATASET], "trainings": []})
    rx = load_experiment(str(exp), [f"site.localhpc.paths.datasets={rx.sites['localhpc'].paths.root}/login-ds"],
                         placeholders=placeholders_for(ws))
    deploy(rx, ws, client)
    wait_for(client, "/t_login", {"complete"}, timeout=150)
    node = find(tree(client, "t_login"), f"/t_login/localhpc/data/{FAST_DATASET.replace('-', '_')}/stage")
    assert node["meters"]["progress"]["value"] == 100 and node["events"]["verified"] is True
    assert "pull on the login node" not in node["labels"]["info"] and "objects verified at" in node["labels"]["info"]
    dest = f"{rx.sites['localhpc'].paths.root}/login-ds/{FAST_DATASET}.zarr"
    res = _cli(ws, "transfer", "verify", FAST_DATASET, "--site", "localhpc", "--dest", dest)
    assert res.exit_code == 0 and "all" in res.output, res.output


def test_worker_runs_a_queued_transfer_task(tstack, tmp_path):
    from maelflow.datasets.worker import run_worker

    ws = tstack
    cat = _catalogue(ws)
    _published(ws, tmp_path, "tr-task", chunks=20)
    task = cat.create("tasks", {"action": "transfer-dataset", "dataset": "tr-task", "source": "ewc",
                                "destination": "localhpc"})
    missing = cat.create("tasks", {"action": "transfer-dataset", "dataset": "tr-nothing", "source": "ewc",
                                   "destination": "localhpc"})
    site = load_site("localhpc", ws)
    lines: list[str] = []
    assert run_worker(ws, "localhpc", site, once=True, log=lines.append) == 2
    done = cat.get("tasks", task["uuid"])
    assert done["status"] == "completed" and done["progress"]["percentage"] == 100, done
    assert cat.get("datasets", "tr-task")["locations"]["localhpc"]["path"] == f"{site.paths.datasets}/tr-task.zarr"
    failed = cat.get("tasks", missing["uuid"])
    assert failed["status"] == "failed" and "not published" in failed["message"]
    assert run_worker(ws, "localhpc", site, once=True, log=lines.append) == 0


def test_push_from_a_local_copy_killed_and_resumed(tstack, tmp_path):
    """The push's rsync streams killed midway (with it: they die with their parent): the site's
    folder is never visible; the re-run (from the store this time) copies only the rest; the
    journal lines the site's hash batches appended are what it trusts."""
    ws = tstack
    n = 300
    src = _published(ws, tmp_path, "tr-push", chunks=n - 2, size=16_384)
    site = load_site("localhpc", ws)
    dest = Path(f"{site.paths.datasets}/tr-push.zarr")          # the loopback site's disk is this disk
    partial = dest.with_name(".tr-push.zarr.partial")
    env = {**os.environ, "MAELFLOW_WORKSPACE": str(ws.root)}
    complete = _kill_midway(["tr-push", "--site", "localhpc", "-o", "internet.login=false", "--from", str(src),
                             "--workers", "2", "--max-rate", str(1_000_000)], env, dest, partial, n // 2,
                            settle=0.5)     # the site's rsync receivers see their sender gone
    journal = [ln for j in partial.glob(".maelflow-journal*") for ln in j.read_text().splitlines()]
    assert n // 2 <= len(complete) < n and journal and all(len(ln.split()[0]) == 64 for ln in journal)
    res = _cli(ws, "transfer", "stage", "tr-push", "--site", "localhpc", "-o", "internet.login=false", "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.strip().splitlines()[-1])["result"]
    assert result["already"] == len(complete) and result["copied"] == n - len(complete), (result, len(complete))
    assert _cli(ws, "transfer", "verify", "tr-push", "--site", "localhpc").exit_code == 0
    assert not partial.exists()
    # a local copy that differs from the published dataset is refused, the site left as it was
    (src / "data" / "7.0").write_bytes(b"\0" * 16_384)
    other = f"{site.paths.root}/elsewhere/tr-push.zarr"
    res = _cli(ws, "transfer", "stage", "tr-push", "--site", "localhpc", "--from", str(src), "--dest", other)
    assert res.exit_code == 1 and "the local copy differs from the published dataset" in res.output, res.output
    assert not Path(other).exists()


def test_push_answers_to_its_former_name_sftp(tstack, tmp_path):
    """``--via sftp`` (what suites and scripts wrote before) is the push, with one stream too."""
    ws = tstack
    _published(ws, tmp_path, "tr-alias", chunks=12, size=300_000)
    res = _cli(ws, "transfer", "stage", "tr-alias", "--site", "localhpc", "--via", "sftp", "--workers", "1", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["via"] == "push" and out["result"]["copied"] == 14
    assert _cli(ws, "transfer", "verify", "tr-alias", "--site", "localhpc").exit_code == 0


def test_push_with_a_refused_or_missing_key_says_how_to_renew(tstack, tmp_path):
    """A key the site refuses, or one that is not there, is the site's credential error with its
    hint, before anything is sent."""
    ws = tstack
    _published(ws, tmp_path, "tr-badkey", chunks=5)
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    for key, says in ((other, "refused the key"), (tmp_path / "missing_key", "private key file is missing")):
        res = _cli(ws, "transfer", "stage", "tr-badkey", "--site", "localhpc", "-o", "internet.login=false",
                   "-o", f"connection.ssh.identity_file={key}")
        assert res.exit_code == 1 and says in res.output and "services up --with-hpc" in res.output, res.output
    site = load_site("localhpc", ws)
    assert not Path(f"{site.paths.datasets}/tr-badkey.zarr").exists()


def test_truncated_object_in_the_store_is_never_staged(tstack, tmp_path):
    """An object cut short in the store (an interrupted upload by another tool): refused after the
    same re-reads as a corrupt one, never placed, the destination never visible; once the store is
    mended a re-run completes."""
    import obstore

    ws = tstack
    _published(ws, tmp_path, "tr-truncated", chunks=10)
    store = open_store(ewc_settings(ws), "datasets/tr-truncated.zarr")
    whole = bytes(obstore.get(store.objects, "data/6.0").bytes())
    obstore.put(store.objects, "data/6.0", whole[: len(whole) // 3])
    store.backoff = Backoff(attempts=3, base=0.01, cap=0.05)
    dest = tmp_path / "site" / "tr-truncated.zarr"
    with pytest.raises(ChecksumMismatch) as err:
        stage(store, LocalTree(dest), "tr-truncated", workers=4, retries=2)
    assert "data/6.0" in str(err.value)
    assert not dest.exists()
    partial = dest.with_name(".tr-truncated.zarr.partial")
    assert not (partial / "data" / "6.0").exists()
    obstore.put(store.objects, "data/6.0", whole)         # the store mended: the re-run completes
    res = stage(store, LocalTree(dest), "tr-truncated", workers=4)
    assert res.copied >= 1 and res.copied + res.already == res.objects
    assert (dest / "data" / "6.0").read_bytes() == whole
