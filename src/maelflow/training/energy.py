"""How much energy a training used, from every source the node offers, and never a silent estimate.

Why: a benchmark of ML training across sites is also a question of joules, and the tools that answer
it fail quietly (CodeCarbon replaces a missing measurement with a TDP estimate; MLflow's system
metrics log watts, no integral). Here each source gives one reading that says how it was obtained
(``method``) and how far to trust it (``quality``: ``measured``, ``estimated`` or ``unavailable``,
the last always with a ``reason``). Sources, each read at the start and the end of the training:

- ``nvml``: NVIDIA GPUs, ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded; Volta
  and newer), through ``pynvml`` when it imports;
- ``amdsmi``: AMD GPUs, ``amdsmi_get_energy_count`` (a counter times its resolution in µJ);
- ``cray_pm``: Cray EX node counters ``/sys/cray/pm_counters/{energy,cpu_energy,memory_energy,
  accel*_energy}`` (LUMI); a change of ``generation`` between the readings voids them;
- ``rapl``: CPU packages (and their DRAM zones) in ``/sys/class/powercap/intel-rapl:*/energy_uj``,
  one wrap-around of ``max_energy_range_uj`` allowed; mode 0400 on most kernels (CVE-2020-8694);
- ``sacct``: SLURM's ``ConsumedEnergyRaw`` of the job, which SLURM fills in only once the job has
  ended (and only where the site sets ``AcctGatherEnergyType``): inside the job it is
  ``unavailable``, and :func:`record_job_energy` adds it to the MLflow run afterwards (the
  benchmark report task asks, through :mod:`maelflow.training.job_energy`).

The file system sources are read under a configurable ``root`` and the GPU libraries can be passed
in, so tests run on fake sysfs trees and a fake NVML. The scope is the node the reading process
runs on (rank 0's node in a multi-node training); ``sacct`` covers the whole job.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)

MEASURED, ESTIMATED, UNAVAILABLE = "measured", "estimated", "unavailable"
QUALITIES = (MEASURED, ESTIMATED, UNAVAILABLE)
ROOT_ENV = "MAELFLOW_ENERGY_ROOT"


@dataclass
class EnergyReading:
    """One source's energy over the training: joules, how they were obtained, how far to trust them."""

    source: str                      # nvml | amdsmi | cray_pm | rapl | sacct
    scope: str                       # gpu | cpu | node | job
    quality: str = UNAVAILABLE
    joules: float | None = None
    method: str = ""
    reason: str | None = None
    parts: dict[str, float] = field(default_factory=dict)   # per device / counter, joules

    def __post_init__(self) -> None:
        if self.quality not in QUALITIES:
            raise ValueError(f"energy quality {self.quality!r} is not one of {QUALITIES}")
        if self.quality == UNAVAILABLE and not self.reason:
            raise ValueError(f"energy source {self.source}: 'unavailable' needs a reason")
        if self.quality != UNAVAILABLE and self.joules is None:
            raise ValueError(f"energy source {self.source}: {self.quality} needs joules")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _unavailable(source: str, scope: str, reason: str, method: str = "") -> EnergyReading:
    return EnergyReading(source, scope, UNAVAILABLE, None, method, reason)


def _err(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


# ------------------------------------------------------------------------------------- probes
class Probe:
    """Reads a counter at ``start()`` and again at ``stop()``; ``stop()`` gives the reading.
    Neither raises: a failure becomes an ``unavailable`` reading with its reason."""

    source = "?"
    scope = "?"

    def __init__(self) -> None:
        self._reason: str | None = None
        self._start: Any = None

    def start(self) -> None:
        try:
            self._start = self._read()
        except Exception as exc:  # noqa: BLE001 - a probe never ends a training
            self._reason = self._reason or _err(exc)

    def stop(self) -> EnergyReading:
        if self._reason:
            return _unavailable(self.source, self.scope, self._reason)
        if self._start is None:
            return _unavailable(self.source, self.scope, "not started")
        try:
            return self._reading(self._start, self._read())
        except Exception as exc:  # noqa: BLE001
            return _unavailable(self.source, self.scope, _err(exc))
        finally:
            self._close()

    def _read(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _reading(self, start: Any, end: Any) -> EnergyReading:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close(self) -> None:
        pass


def _visible_gpus(env: Mapping[str, str]) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` / ``ROCR_VISIBLE_DEVICES`` entries, or None for all devices."""
    for var in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        value = env.get(var)
        if value is not None and value.strip() not in ("", "all"):
            return [v.strip() for v in value.split(",") if v.strip()]
    return None


class NvmlProbe(Probe):
    source, scope = "nvml", "gpu"

    def __init__(self, nvml: Any = None, env: Mapping[str, str] | None = None):
        super().__init__()
        self._nvml = nvml
        self._env = os.environ if env is None else env
        self._handles: list[tuple[str, Any]] = []
        self._inited = False

    def _module(self) -> Any:
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError:
                self._reason = "pynvml (nvidia-ml-py) is not installed"
                raise
        return self._nvml

    def _read(self) -> dict[str, int]:
        nv = self._module()
        if not self._inited:
            try:
                nv.nvmlInit()
            except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded...
                self._reason = f"NVML cannot start: {_err(exc)} (no NVIDIA driver on this node?)"
                raise
            self._inited = True
            count = int(nv.nvmlDeviceGetCount())
            if count == 0:
                self._reason = "NVML sees no GPU"
                raise RuntimeError(self._reason)
            wanted = _visible_gpus(self._env)
            if wanted is None:
                wanted = [str(i) for i in range(count)]
            for dev in wanted:
                if dev.isdigit():
                    handle = nv.nvmlDeviceGetHandleByIndex(int(dev))
                else:
                    handle = nv.nvmlDeviceGetHandleByUUID(dev)
                self._handles.append((dev, handle))
        values = {}
        for dev, handle in self._handles:
            try:
                values[dev] = int(nv.nvmlDeviceGetTotalEnergyConsumption(handle))
            except Exception as exc:  # noqa: BLE001 - NVMLError_NotSupported before Volta
                self._reason = f"GPU {dev}: nvmlDeviceGetTotalEnergyConsumption: {_err(exc)}"
                raise
        return values

    def _reading(self, start: dict[str, int], end: dict[str, int]) -> EnergyReading:
        parts = {f"gpu{dev}": (end[dev] - start[dev]) / 1000.0 for dev in start}
        return EnergyReading(self.source, self.scope, MEASURED, sum(parts.values()),
                             f"NVML nvmlDeviceGetTotalEnergyConsumption, {len(parts)} GPU(s)", parts=parts)

    def _close(self) -> None:
        if self._inited:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._inited = False


class AmdSmiProbe(Probe):
    source, scope = "amdsmi", "gpu"

    def __init__(self, amdsmi: Any = None):
        super().__init__()
        self._amd = amdsmi
        self._handles: list[Any] = []
        self._inited = False

    def _read(self) -> dict[int, float]:
        if self._amd is None:
            try:
                self._amd = importlib.import_module("amdsmi")
            except ImportError:
                self._reason = "amdsmi is not installed"
                raise
        amd = self._amd
        if not self._inited:
            try:
                amd.amdsmi_init()
            except Exception as exc:  # noqa: BLE001
                self._reason = f"AMD SMI cannot start: {_err(exc)} (no AMD GPU driver on this node?)"
                raise
            self._inited = True
            self._handles = list(amd.amdsmi_get_processor_handles())
            if not self._handles:
                self._reason = "AMD SMI sees no GPU"
                raise RuntimeError(self._reason)
        values = {}
        for i, handle in enumerate(self._handles):
            info = amd.amdsmi_get_energy_count(handle)
            # amdsmi >= 6.4 says energy_accumulator; older releases named the same counter 'power'
            counter = info.get("energy_accumulator", info.get("power"))
            resolution = float(info.get("counter_resolution", 0.0))  # µJ per count
            if counter is None or resolution <= 0:
                self._reason = f"GPU {i}: amdsmi_get_energy_count gave no counter ({sorted(info)})"
                raise RuntimeError(self._reason)
            values[i] = float(counter) * resolution / 1e6
        return values

    def _reading(self, start: dict[int, float], end: dict[int, float]) -> EnergyReading:
        parts = {f"gpu{i}": end[i] - start[i] for i in start}
        return EnergyReading(self.source, self.scope, MEASURED, sum(parts.values()),
                             f"AMD SMI amdsmi_get_energy_count, {len(parts)} GPU(s)", parts=parts)

    def _close(self) -> None:
        if self._inited:
            try:
                self._amd.amdsmi_shut_down()
            except Exception:  # noqa: BLE001
                pass
            self._inited = False


_FIRST_INT = re.compile(r"\s*(\d+)")


def _read_int(path: Path) -> int:
    match = _FIRST_INT.match(path.read_text())
    if not match:
        raise ValueError(f"{path}: no number in {path.read_text()[:40]!r}")
    return int(match.group(1))


class CrayPmProbe(Probe):
    """Cray EX node counters: ``energy`` is the whole node; cpu, memory and accelerators are parts."""

    source, scope = "cray_pm", "node"

    def __init__(self, root: Path | str = "/"):
        super().__init__()
        self.dir = Path(root) / "sys/cray/pm_counters"

    def _read(self) -> dict[str, int]:
        if not (self.dir / "energy").exists():
            self._reason = f"no Cray pm_counters at {self.dir} (not a Cray EX node)"
            raise FileNotFoundError(self._reason)
        values = {}
        for path in sorted(self.dir.iterdir()):
            if path.name == "energy" or path.name.endswith("_energy") or path.name == "generation":
                try:
                    values[path.name] = _read_int(path)
                except PermissionError:
                    self._reason = f"{path} is not readable by this user"
                    raise
        return values

    def _reading(self, start: dict[str, int], end: dict[str, int]) -> EnergyReading:
        if start.get("generation") != end.get("generation"):
            return _unavailable(self.source, self.scope, "the pm_counters generation changed during the training "
                                f"({start.get('generation')} -> {end.get('generation')}): counters were reset")
        parts = {name.removesuffix("_energy"): float(end[name] - start[name])
                 for name in start if name.endswith("_energy") and name in end}
        return EnergyReading(self.source, self.scope, MEASURED, float(end["energy"] - start["energy"]),
                             f"Cray pm_counters {self.dir}/energy (node)", parts=parts)


class RaplProbe(Probe):
    """CPU packages and their DRAM zones through the Linux powercap interface."""

    source, scope = "rapl", "cpu"

    def __init__(self, root: Path | str = "/"):
        super().__init__()
        self.dir = Path(root) / "sys/class/powercap"

    def _zones(self) -> list[Path]:
        zones = sorted(p for p in self.dir.glob("intel-rapl:*") if re.fullmatch(r"intel-rapl:\d+", p.name))
        subzones = []
        for zone in zones:   # the package counter excludes DRAM: add a 'dram' subzone where there is one
            for sub in sorted(zone.glob(f"{zone.name}:*")):
                try:
                    if (sub / "name").read_text().strip() == "dram":
                        subzones.append(sub)
                except OSError:
                    continue
        return zones + subzones

    def _read(self) -> dict[str, tuple[int, int]]:
        zones = self._zones() if self.dir.is_dir() else []
        if not zones:
            self._reason = f"no RAPL powercap zones at {self.dir}/intel-rapl:*"
            raise FileNotFoundError(self._reason)
        values = {}
        for zone in zones:
            try:
                energy = _read_int(zone / "energy_uj")
            except PermissionError:
                self._reason = (f"{zone}/energy_uj is not readable by this user (mode 0400 since CVE-2020-8694; "
                                "a site's sysfs rule can open it)")
                raise
            try:
                limit = _read_int(zone / "max_energy_range_uj")
            except OSError:
                limit = 0
            try:
                name = (zone / "name").read_text().strip()
            except OSError:
                name = zone.name
            values[f"{zone.name}:{name}"] = (energy, limit)
        return values

    def _reading(self, start: dict[str, tuple[int, int]], end: dict[str, tuple[int, int]]) -> EnergyReading:
        parts = {}
        for key, (e0, limit) in start.items():
            e1 = end[key][0]
            delta = e1 - e0
            if delta < 0:   # the counter wrapped (once: RAPL cannot tell more)
                if limit <= 0:
                    return _unavailable(self.source, self.scope, f"{key}: the counter went back and its "
                                        "max_energy_range_uj is unknown")
                delta += limit
            parts[key] = delta / 1e6
        return EnergyReading(self.source, self.scope, MEASURED, sum(parts.values()),
                             f"RAPL powercap energy_uj, {len(parts)} zone(s)", parts=parts)


Runner = Callable[..., subprocess.CompletedProcess]


def sacct_energy(job_id: str, run: Runner = subprocess.run, which: Callable[[str], str | None] = shutil.which,
                 ) -> EnergyReading:
    """SLURM's ``ConsumedEnergyRaw`` (J) of job ``job_id``, as recorded once the job ended."""
    if which("sacct") is None:
        return _unavailable("sacct", "job", "sacct is not on PATH (no SLURM accounting here)")
    try:
        proc = run(["sacct", "-j", str(job_id), "--format=JobID,State,ConsumedEnergyRaw", "--noheader",
                    "--parsable2"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return _unavailable("sacct", "job", f"sacct failed: {_err(exc)}")
    if proc.returncode == 127:
        return _unavailable("sacct", "job", "sacct is not on PATH where the job ran (no SLURM accounting there)")
    if proc.returncode != 0:
        return _unavailable("sacct", "job", f"sacct failed (exit {proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()[:200]}")
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip()]
    row = next((r for r in rows if r[0] == str(job_id)), None)
    if row is None:
        return _unavailable("sacct", "job", f"sacct knows no job {job_id}")
    state = row[1] if len(row) > 1 else ""
    if state in ("RUNNING", "PENDING", "REQUEUED", "SUSPENDED"):
        return _unavailable("sacct", "job", f"job {job_id} is {state}: SLURM records ConsumedEnergy once it ends")
    raw = row[2].strip() if len(row) > 2 else ""
    if not raw.isdigit() or int(raw) == 0:
        return _unavailable("sacct", "job", f"SLURM recorded no energy for job {job_id} (the site sets no "
                            "AcctGatherEnergyType)")
    return EnergyReading("sacct", "job", MEASURED, float(raw), f"SLURM sacct ConsumedEnergyRaw of job {job_id}")


class SacctProbe(Probe):
    """Inside a job, SLURM has not recorded the job's energy yet: say so, and where it will be."""

    source, scope = "sacct", "job"

    def __init__(self, env: Mapping[str, str] | None = None):
        super().__init__()
        self._env = os.environ if env is None else env

    def _read(self) -> str | None:
        return self._env.get("SLURM_JOB_ID")

    def stop(self) -> EnergyReading:
        job = self._env.get("SLURM_JOB_ID")
        if not job:
            return _unavailable(self.source, self.scope, "not a SLURM job")
        return _unavailable(self.source, self.scope, f"job {job} is still running: SLURM records ConsumedEnergy "
                            "when it ends (the benchmark report task reads it afterwards)")


# ------------------------------------------------------------------------------------- meter
@dataclass
class EnergySummary:
    """What one line of a report says: the total, how it was made, how far to trust it."""

    quality: str
    total_j: float | None
    method: str
    scope: str
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(readings: Iterable[EnergyReading]) -> EnergySummary:
    """The best total: a whole-node counter (Cray), else GPUs plus CPUs where measured. The reason
    names every source that gave nothing, so a partial scope is never mistaken for the whole."""
    readings = list(readings)
    ok = {r.source: r for r in readings if r.quality != UNAVAILABLE}
    missing = "; ".join(f"{r.source}: {r.reason}" for r in readings if r.quality == UNAVAILABLE) or None
    for source in ("sacct", "cray_pm"):   # whole job, whole node
        if source in ok:
            r = ok[source]
            return EnergySummary(r.quality, r.joules, source, r.scope, missing)
    parts = [r for r in readings if r.quality != UNAVAILABLE and r.scope in ("gpu", "cpu")]
    if not parts:
        return EnergySummary(UNAVAILABLE, None, "none", "none", missing or "no energy source")
    quality = ESTIMATED if any(r.quality == ESTIMATED for r in parts) else MEASURED
    scopes = "+".join(dict.fromkeys(r.scope for r in parts))
    return EnergySummary(quality, sum(r.joules or 0.0 for r in parts), "+".join(r.source for r in parts), scopes,
                         missing)


class EnergyMeter:
    """Every probe, started together at the training's start and read together at its end."""

    def __init__(self, root: Path | str | None = None, nvml: Any = None, amdsmi: Any = None,
                 env: Mapping[str, str] | None = None, probes: list[Probe] | None = None):
        env = os.environ if env is None else env
        root = Path(root if root is not None else env.get(ROOT_ENV, "/"))
        self.probes = probes if probes is not None else [
            NvmlProbe(nvml, env), AmdSmiProbe(amdsmi), CrayPmProbe(root), RaplProbe(root), SacctProbe(env)]
        self.readings: list[EnergyReading] = []

    def start(self) -> None:
        for probe in self.probes:
            probe.start()

    def stop(self) -> list[EnergyReading]:
        self.readings = [probe.stop() for probe in self.probes]
        return self.readings


# ------------------------------------------------------------------------------------- MLflow
def mlflow_fields(readings: list[EnergyReading], summary: EnergySummary) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics (``energy/total_j``, ``energy/<source>_j``) and tags (``energy_quality``,
    ``energy_method``, ``energy_scope``, ``energy_reason``, ``energy.<source>``) of a reading set."""
    metrics: dict[str, float] = {}
    if summary.total_j is not None:
        metrics["energy/total_j"] = float(summary.total_j)
    for r in readings:
        if r.joules is not None:
            metrics[f"energy/{r.source}_j"] = float(r.joules)
    tags = {"energy_quality": summary.quality, "energy_method": summary.method, "energy_scope": summary.scope}
    if summary.reason:
        tags["energy_reason"] = summary.reason[:5000]
    for r in readings:
        tags[f"energy.{r.source}"] = (f"{r.quality}: {r.joules:.1f} J ({r.method})" if r.joules is not None
                                      else f"{r.quality}: {r.reason}")[:5000]
    return metrics, tags


def record_job_energy(tracking_uri: str, run_id: str, job_id: str, run: Runner = subprocess.run,
                      which: Callable[[str], str | None] = shutil.which) -> EnergyReading:
    """After a SLURM job: its ``ConsumedEnergyRaw`` into the MLflow run the job trained in.

    A measured job total becomes the run's ``energy/total_j`` (the whole job on every node, which no
    in-job probe sees); an unavailable one only adds its reason under the tag ``energy.sacct``.
    """
    from mlflow import MlflowClient

    reading = sacct_energy(job_id, run=run, which=which)
    client = MlflowClient(tracking_uri)
    tags = client.get_run(run_id).data.tags
    if reading.quality == UNAVAILABLE:
        client.set_tag(run_id, "energy.sacct", f"unavailable: {reading.reason}")
        return reading
    client.log_metric(run_id, "energy/sacct_j", float(reading.joules or 0.0))
    client.log_metric(run_id, "energy/total_j", float(reading.joules or 0.0))
    others = tags.get("energy_reason")
    for key, value in {"energy.sacct": f"measured: {reading.joules:.1f} J ({reading.method})",
                       "energy_quality": MEASURED, "energy_method": "sacct", "energy_scope": "job"}.items():
        client.set_tag(run_id, key, value)
    if others:   # the job's total supersedes what the in-job sources could not read
        rest = "; ".join(p for p in others.split("; ") if not p.startswith("sacct:"))
        if rest:
            client.set_tag(run_id, "energy_reason", rest)
        else:
            client.delete_tag(run_id, "energy_reason")
    return reading


def dumps(readings: list[EnergyReading], summary: EnergySummary) -> str:
    return json.dumps({"summary": summary.to_json(), "sources": [r.to_json() for r in readings]}, indent=2)
