#!/usr/bin/env python3
"""Catalogue lookups under concurrent load, against a direct S3 GET of the same JSON documents.

What it does, in one run, in a throw-away workspace (real rclone S3 + the catalogue service):
1. loads 10 000 datasets and 100 000 checkpoints through the API (bulk endpoint, 2000 per request);
2. looks entries up by key (``GET /api/v1/{datasets|weights}/KEY``) and by exact filter
   (``GET /api/v1/weights?uuid=U``) from CONCURRENCY threads, each on its own keep-alive connection;
3. fetches the same documents straight from S3 (presigned GETs of the entries' JSON documents,
   signed before the clock starts), with the same HTTP client and concurrency: that is what a
   catalogue without an index would pay per lookup;
4. rebuilds the index from S3 and times it.
It prints p50/p99 latency and requests per second for each, and the comparison as the last line.

BENCH_SMALL=1 runs a one-minute version (1 000 datasets, 10 000 checkpoints, shorter load phases).
Client and server share this machine's cores: compare the two lines of one run, not across machines.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from maelflow.ewc import workspace_store  # noqa: E402
from maelflow.services import stack  # noqa: E402
from maelflow.services.catalogue import open_catalogue  # noqa: E402
from maelflow.workspace import catalogue_paths  # noqa: E402
from maelflow.workspace import Workspace  # noqa: E402

SMALL = os.environ.get("BENCH_SMALL") == "1"
N_DATASETS = 1_000 if SMALL else 10_000
N_CHECKPOINTS = 10_000 if SMALL else 100_000
SECONDS = 6.0 if SMALL else 20.0          # per measured phase
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "16"))
BATCH = 2000
TARGET_P99_MS = 50.0


def dataset_name(i: int) -> str:
    return f"aifs-ea-an-oper-{i:04d}-mars-o96-1979-2022-6h-v1-bench"


def checkpoint_uuid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def dataset_record(i: int) -> dict:
    return {"name": dataset_name(i), "status": "experimental", "metadata": {
        "uuid": f"ds-uuid-{i}", "shape": [14608, 98, 1, 40320], "variables": [f"var{v}" for v in range(98)],
        "frequency": "6h", "resolution": "o96", "total_size": 10**9 + i, "total_number_of_files": 1000 + i,
        "start_date": "1979-01-01T00:00:00", "end_date": "2022-12-31T18:00:00"}}


def checkpoint_record(i: int) -> dict:
    run = f"run-{i // 20:05d}"
    return {"uuid": checkpoint_uuid(i), "metadata": {
        "uuid": checkpoint_uuid(i), "run_id": run, "timestamp": "2026-11-23T10:00:00", "seed": i,
        "dataset": {"arguments": {"args": [f"/data/{dataset_name(i % N_DATASETS)}.zarr"]}},
        "config": {"training": {"run_id": run, "max_epochs": 10, "lr": 0.000625},
                   "model": {"num_channels": 512, "processor": "transformer"}},
        "provenance_training": {"python": "3.11.2", "anemoi-training": "0.10.0", "torch": "2.13.0"},
        "size": 1_200_000_000, "path": f"/scratch/runs/{run}/checkpoint-{i}.ckpt"},
        "locations": {"ewc": {"path": f"s3://catalogue/artefacts/weights/{checkpoint_uuid(i)}.ckpt"}}}


class Http:
    """One keep-alive connection per thread: the cheapest client Python has, the same for both targets."""

    def __init__(self, base: str, headers: dict | None = None, timeout: float = 30):
        u = urllib.parse.urlsplit(base)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout
        self.headers = headers or {}
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            self.conn.request("GET", path, headers=self.headers)
            resp = self.conn.getresponse()
            return resp.status, resp.read()
        except (http.client.HTTPException, OSError):
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            raise

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.conn.request("POST", path, body=body, headers={**self.headers, "Content-Type": "application/json"})
        resp = self.conn.getresponse()
        return resp.status, resp.read()


def load(base: str, token: str) -> float:
    client = Http(base, {"Authorization": f"Bearer {token}"}, timeout=300)
    t0 = time.perf_counter()
    for collection, count, make in (("datasets", N_DATASETS, dataset_record), ("weights", N_CHECKPOINTS, checkpoint_record)):
        for start in range(0, count, BATCH):
            body = json.dumps([make(i) for i in range(start, min(start + BATCH, count))]).encode()
            status, answer = client.post(f"/api/v1/_bulk/{collection}", body)
            if status != 201:
                raise SystemExit(f"bulk load of {collection} failed: {status} {answer[:300]!r}")
    return time.perf_counter() - t0


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (the server's cost, whatever else the machine runs)."""
    if not pid:
        return float("nan")
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hammer(base: str, paths: list[str], headers: dict | None, seconds: float, server_pid: int | None = None) -> dict:
    """CONCURRENCY threads GET random paths for ``seconds``; latencies of 2xx answers, errors counted."""
    latencies: list[list[float]] = [[] for _ in range(CONCURRENCY)]
    errors = [0] * CONCURRENCY
    stop = threading.Event()
    start_gate = threading.Barrier(CONCURRENCY + 1)

    def worker(n: int) -> None:
        rng = random.Random(n)
        client = Http(base, headers)
        client.get(paths[0])  # connect before the clock starts
        start_gate.wait()
        mine = latencies[n]
        while not stop.is_set():
            path = paths[rng.randrange(len(paths))]
            t = time.perf_counter()
            try:
                status, _ = client.get(path)
            except (http.client.HTTPException, OSError):
                errors[n] += 1
                continue
            if 200 <= status < 300:
                mine.append(time.perf_counter() - t)
            else:
                errors[n] += 1

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(CONCURRENCY)]
    for t in threads:
        t.start()
    start_gate.wait()
    cpu0 = cpu_seconds(server_pid)
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(server_pid) - cpu0
    flat = sorted(x for part in latencies for x in part)
    if not flat:
        raise SystemExit("no successful request")
    return {"n": len(flat), "errors": sum(errors), "rps": len(flat) / elapsed,
            "p50": 1000 * flat[len(flat) // 2], "p99": 1000 * flat[min(len(flat) - 1, int(len(flat) * 0.99))],
            "mean": 1000 * statistics.fmean(flat), "cpu_us": 1e6 * cpu / len(flat)}


def show(label: str, r: dict) -> None:
    print(f"{label:<44} p50 {r['p50']:6.2f} ms  p99 {r['p99']:6.2f} ms  {r['rps']:7.0f} req/s  "
          f"server CPU {r['cpu_us']:5.0f} us/request  ({r['n']} ok, {r['errors']} errors)", flush=True)


def main() -> None:
    root = Path(os.environ.get("BENCH_WORKSPACE") or tempfile.mkdtemp(prefix="catalogue-bench-"))
    ws = Workspace(root)
    print(f"catalogue bench: {N_DATASETS} datasets, {N_CHECKPOINTS} checkpoints, {CONCURRENCY} concurrent clients, "
          f"{SECONDS:.0f} s per phase, {os.cpu_count()} cores (client and servers share them); workspace {root}",
          flush=True)
    try:
        infos = stack.up(ws, names=["s3", "catalogue"])
        base = infos["catalogue"].url
        from maelflow_registry.auth import TokenStore

        token = TokenStore(catalogue_paths(ws)).create("read", name="bench-read")[0]
        admin = TokenStore(catalogue_paths(ws)).create("admin", name="bench-admin")[0]
        took = load(base, admin)
        total = N_DATASETS + N_CHECKPOINTS
        print(f"{'load through the API (bulk, S3 first)':<44} {total} entries in {took:.1f} s: {total / took:.0f} entries/s",
              flush=True)

        rng = random.Random(1)
        sample_ds = [dataset_name(rng.randrange(N_DATASETS)) for _ in range(2000)]
        sample_ck = [checkpoint_uuid(rng.randrange(N_CHECKPOINTS)) for _ in range(4000)]
        auth = {"Authorization": f"Bearer {token}"}
        by_key = [f"/api/v1/datasets/{n}" for n in sample_ds] + [f"/api/v1/weights/{u}" for u in sample_ck]
        by_filter = [f"/api/v1/weights?uuid={u}" for u in sample_ck[:2000]] + \
                    [f"/api/v1/datasets?uuid=ds-uuid-{rng.randrange(N_DATASETS)}" for _ in range(1000)]

        import datetime

        import obstore
        from maelflow_registry.store import entry_object

        presigned = obstore.sign(workspace_store(ws, "catalogue"), "GET",
                                 [entry_object(p.split("/")[3], p.split("/")[4]) for p in by_key],
                                 datetime.timedelta(hours=1))
        s3_base = "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(presigned[0]))
        s3_paths = [urllib.parse.urlsplit(u)._replace(scheme="", netloc="").geturl() for u in presigned]

        cat_pid, s3_pid = infos["catalogue"].pid, infos["s3"].pid
        key_result = hammer(base, by_key, auth, SECONDS, cat_pid)
        show("catalogue lookup by key (index)", key_result)
        filter_result = hammer(base, by_filter, auth, SECONDS, cat_pid)
        show("catalogue lookup by exact filter (index)", filter_result)
        s3_result = hammer(s3_base, s3_paths, None, SECONDS, s3_pid)
        show("direct S3 GET of the same JSON document", s3_result)

        catalogue = open_catalogue(ws, rebuild=False)
        t0 = time.perf_counter()
        count = catalogue.rebuild()
        took = time.perf_counter() - t0
        print(f"{'index rebuilt from S3 alone':<44} {count} entries in {took:.1f} s: {count / took:.0f} entries/s",
              flush=True)
        if count != total:
            raise SystemExit(f"rebuild found {count} entries, expected {total}")

        ok = key_result["p99"] < TARGET_P99_MS and filter_result["p99"] < TARGET_P99_MS
        print(f"RESULT catalogue lookup p99 {key_result['p99']:.1f} ms by key / {filter_result['p99']:.1f} ms by filter "
              f"(target < {TARGET_P99_MS:.0f} ms: {'met' if ok else 'MISSED'}) at {key_result['rps']:.0f} req/s; "
              f"direct S3 GET p99 {s3_result['p99']:.1f} ms at {s3_result['rps']:.0f} req/s: "
              f"catalogue {key_result['rps'] / s3_result['rps']:.1f}x the throughput, "
              f"p99 {s3_result['p99'] / key_result['p99']:.1f}x lower", flush=True)
    finally:
        stack.down(ws)
        if not os.environ.get("BENCH_WORKSPACE"):
            import shutil

            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
