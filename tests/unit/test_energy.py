"""Energy sources on fake sysfs trees and fake GPU libraries: the expected joules, counter
wrap-around, and every missing source `unavailable` with its reason, never an estimate."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from maelflow.training import energy as en

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------ fake sources
class FakeNvml:
    """pynvml's calls, over counters in mJ that the test moves on."""

    class NVMLError(Exception):
        pass

    def __init__(self, counters_mj: list[int], supported: bool = True, driver: bool = True):
        self.counters = list(counters_mj)
        self.supported, self.driver = supported, driver
        self.shutdown = False

    def nvmlInit(self):
        if not self.driver:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self):
        return len(self.counters)

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return ("handle", int(uuid.rsplit("-", 1)[1]))

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.supported:
            raise self.NVMLError("Not Supported")
        return self.counters[handle[1]]

    def nvmlShutdown(self):
        self.shutdown = True


class FakeAmdSmi:
    def __init__(self, counters: list[int], resolution_uj: float = 15.3, key: str = "energy_accumulator"):
        self.counters, self.resolution, self.key = list(counters), resolution_uj, key

    def amdsmi_init(self):
        pass

    def amdsmi_get_processor_handles(self):
        return list(range(len(self.counters)))

    def amdsmi_get_energy_count(self, handle):
        return {self.key: self.counters[handle], "counter_resolution": self.resolution, "timestamp": 0}

    def amdsmi_shut_down(self):
        pass


def write(path: Path, text: str, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mode is not None:
        os.chmod(path, mode)


def cray(root: Path, energy: int, cpu: int, accel: list[int], generation: int = 3) -> None:
    pm = root / "sys/cray/pm_counters"
    write(pm / "energy", f"{energy} J 1700000000000000 us\n")
    write(pm / "cpu_energy", f"{cpu} J 1700000000000000 us\n")
    write(pm / "memory_energy", "10 J 1700000000000000 us\n")
    for i, value in enumerate(accel):
        write(pm / f"accel{i}_energy", f"{value} J 1700000000000000 us\n")
    write(pm / "generation", f"{generation}\n")
    write(pm / "power", "350 W 1700000000000000 us\n")     # not an energy counter: ignored


def rapl(root: Path, zones: dict[str, tuple[int, int, str]]) -> None:
    for name, (energy, limit, label) in zones.items():
        base = root / "sys/class/powercap" / (name if name.count(":") == 1 else f"{name.rsplit(':', 1)[0]}/{name}")
        write(base / "energy_uj", f"{energy}\n")
        write(base / "max_energy_range_uj", f"{limit}\n")
        write(base / "name", f"{label}\n")


# ------------------------------------------------------------------------------ GPUs
def test_nvml_gives_the_joules_of_the_visible_gpus():
    nv = FakeNvml([1_000_000, 5_000_000, 9_000_000])
    probe = en.NvmlProbe(nv, env={"CUDA_VISIBLE_DEVICES": "0,2"})
    probe.start()
    nv.counters = [1_000_000 + 250_500, 5_000_000 + 999_999, 9_000_000 + 1_000_000]
    r = probe.stop()
    assert r.quality == "measured" and r.scope == "gpu"
    assert r.parts == {"gpu0": pytest.approx(250.5), "gpu2": pytest.approx(1000.0)}
    assert r.joules == pytest.approx(1250.5) and "2 GPU(s)" in r.method and nv.shutdown
    by_uuid = en.NvmlProbe(FakeNvml([0, 0]), env={"CUDA_VISIBLE_DEVICES": "GPU-abc-1"})
    by_uuid.start()
    assert list(by_uuid.stop().parts) == ["gpuGPU-abc-1"]


@pytest.mark.parametrize("fake,needle", [
    (FakeNvml([0], driver=False), "NVML cannot start"),
    (FakeNvml([0], supported=False), "nvmlDeviceGetTotalEnergyConsumption"),
    (FakeNvml([]), "NVML sees no GPU"),
])
def test_nvml_failures_are_unavailable_with_the_reason(fake, needle):
    probe = en.NvmlProbe(fake, env={})
    probe.start()
    r = probe.stop()
    assert r.quality == "unavailable" and r.joules is None and needle in r.reason


def test_amd_smi_counters_times_their_resolution():
    amd = FakeAmdSmi([1000, 2000], resolution_uj=15.3)
    probe = en.AmdSmiProbe(amd)
    probe.start()
    amd.counters = [1000 + 10_000_000, 2000 + 20_000_000]
    r = probe.stop()
    assert r.quality == "measured"
    assert r.joules == pytest.approx((10_000_000 + 20_000_000) * 15.3 / 1e6)
    old = FakeAmdSmi([0], resolution_uj=1.0, key="power")          # amdsmi < 6.4 names the counter 'power'
    probe = en.AmdSmiProbe(old)
    probe.start()
    old.counters = [3_000_000]
    assert probe.stop().joules == pytest.approx(3.0)


# ------------------------------------------------------------------------------ nodes and CPUs
def test_cray_pm_counters_node_energy_and_its_parts(tmp_path):
    cray(tmp_path, energy=1_000_000, cpu=400_000, accel=[100, 200])
    probe = en.CrayPmProbe(tmp_path)
    probe.start()
    cray(tmp_path, energy=1_036_000, cpu=412_000, accel=[5_100, 6_200])
    r = probe.stop()
    assert r.quality == "measured" and r.scope == "node" and r.joules == 36_000
    assert r.parts == {"cpu": 12_000, "memory": 0, "accel0": 5_000, "accel1": 6_000}


def test_cray_counters_reset_during_the_training_void_the_reading(tmp_path):
    cray(tmp_path, energy=1_000_000, cpu=0, accel=[], generation=3)
    probe = en.CrayPmProbe(tmp_path)
    probe.start()
    cray(tmp_path, energy=500, cpu=0, accel=[], generation=4)
    r = probe.stop()
    assert r.quality == "unavailable" and "generation changed" in r.reason


def test_rapl_packages_plus_dram_with_wrap_around(tmp_path):
    limit = 262_143_328_850
    rapl(tmp_path, {"intel-rapl:0": (limit - 1_000_000, limit, "package-0"),
                    "intel-rapl:1": (5_000_000, limit, "package-1"),
                    "intel-rapl:0:0": (7_000, limit, "core"),            # part of the package: not added
                    "intel-rapl:0:1": (1_000_000, limit, "dram")})
    probe = en.RaplProbe(tmp_path)
    probe.start()
    rapl(tmp_path, {"intel-rapl:0": (2_000_000, limit, "package-0"),      # wrapped: 1 + 2 J
                    "intel-rapl:1": (9_000_000, limit, "package-1"),
                    "intel-rapl:0:0": (9_000_000, limit, "core"),
                    "intel-rapl:0:1": (1_500_000, limit, "dram")})
    r = probe.stop()
    assert r.quality == "measured" and r.scope == "cpu"
    assert r.parts == {"intel-rapl:0:package-0": pytest.approx(3.0), "intel-rapl:1:package-1": pytest.approx(4.0),
                       "intel-rapl:0:1:dram": pytest.approx(0.5)}
    assert r.joules == pytest.approx(7.5)


def test_rapl_unreadable_says_why_even_as_root(tmp_path, monkeypatch):
    rapl(tmp_path, {"intel-rapl:0": (1, 10, "package-0")})
    real = en._read_int

    def denied(path):
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(en, "_read_int", denied)
    probe = en.RaplProbe(tmp_path)
    probe.start()
    r = probe.stop()
    assert r.quality == "unavailable" and "not readable" in r.reason and "CVE-2020-8694" in r.reason


# ------------------------------------------------------------------------------ SLURM
def _sacct(stdout: str, rc: int = 0):
    calls = []

    def run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, rc, stdout, "sacct: error" if rc else "")

    return run, calls


def test_sacct_after_the_job():
    run, calls = _sacct("4242|COMPLETED|91234\n4242.batch|COMPLETED|91000\n4242.0|COMPLETED|90000\n")
    r = en.sacct_energy("4242", run=run, which=lambda n: "/usr/bin/sacct")
    assert r.quality == "measured" and r.joules == 91234 and r.scope == "job"
    assert calls[0][:3] == ["sacct", "-j", "4242"] and any("ConsumedEnergyRaw" in a for a in calls[0])
    for out, needle in (("4242|COMPLETED|0\n", "AcctGatherEnergyType"), ("4242|RUNNING|\n", "RUNNING"),
                        ("", "knows no job")):
        run, _ = _sacct(out)
        r = en.sacct_energy("4242", run=run, which=lambda n: "/usr/bin/sacct")
        assert r.quality == "unavailable" and needle in r.reason
    run, _ = _sacct("", rc=1)
    assert "exit 1" in en.sacct_energy("4242", run=run, which=lambda n: "/x").reason
    assert "not on PATH" in en.sacct_energy("4242", which=lambda n: None).reason
    inside = en.SacctProbe(env={"SLURM_JOB_ID": "77"})
    inside.start()
    assert "job 77 is still running" in inside.stop().reason


# ------------------------------------------------------------------------------ the meter
def test_the_meter_prefers_the_node_counter_and_names_what_is_missing(tmp_path):
    cray(tmp_path, energy=0, cpu=0, accel=[0])
    nv = FakeNvml([0])
    meter = en.EnergyMeter(root=tmp_path, nvml=nv, amdsmi=None, env={})
    meter.start()
    cray(tmp_path, energy=5000, cpu=1000, accel=[3000])
    nv.counters = [2_900_000]
    readings = meter.stop()
    by = {r.source: r for r in readings}
    assert by["cray_pm"].joules == 5000 and by["nvml"].joules == pytest.approx(2900)
    s = en.summarize(readings)
    assert (s.quality, s.total_j, s.method, s.scope) == ("measured", 5000, "cray_pm", "node")
    assert "rapl: no RAPL powercap zones" in s.reason and "sacct: not a SLURM job" in s.reason


def test_gpus_plus_cpus_when_there_is_no_node_counter(tmp_path):
    rapl(tmp_path, {"intel-rapl:0": (0, 10**12, "package-0")})
    nv = FakeNvml([0, 0])
    meter = en.EnergyMeter(root=tmp_path, nvml=nv, env={})
    meter.start()
    rapl(tmp_path, {"intel-rapl:0": (40_000_000, 10**12, "package-0")})
    nv.counters = [100_000, 200_000]
    s = en.summarize(meter.stop())
    assert (s.quality, s.total_j, s.method, s.scope) == ("measured", pytest.approx(340.0), "nvml+rapl", "gpu+cpu")
    metrics, tags = en.mlflow_fields(meter.readings, s)
    assert metrics == {"energy/total_j": pytest.approx(340.0), "energy/nvml_j": pytest.approx(300.0),
                       "energy/rapl_j": pytest.approx(40.0)}
    assert tags["energy_quality"] == "measured" and tags["energy.nvml"].startswith("measured: 300.0 J")
    assert tags["energy.cray_pm"].startswith("unavailable: no Cray pm_counters")


def test_nothing_readable_is_unavailable_with_every_reason(tmp_path):
    meter = en.EnergyMeter(root=tmp_path, nvml=FakeNvml([0], driver=False), env={})
    meter.start()
    readings = meter.stop()
    s = en.summarize(readings)
    assert s.quality == "unavailable" and s.total_j is None
    for source in ("nvml", "amdsmi", "cray_pm", "rapl", "sacct"):
        assert f"{source}: " in s.reason
    metrics, tags = en.mlflow_fields(readings, s)
    assert metrics == {} and tags["energy_quality"] == "unavailable" and tags["energy_method"] == "none"


def test_this_machine_says_unavailable_and_why():
    """No GPU, no Cray counters, no readable RAPL here (the test environment): the real result."""
    meter = en.EnergyMeter()
    meter.start()
    s = en.summarize(meter.stop())
    if s.quality != "unavailable":
        pytest.skip(f"this machine has an energy source: {s.method}")
    assert s.reason and s.total_j is None


def test_a_reading_never_claims_what_it_lacks():
    with pytest.raises(ValueError, match="needs a reason"):
        en.EnergyReading("x", "gpu", "unavailable")
    with pytest.raises(ValueError, match="needs joules"):
        en.EnergyReading("x", "gpu", "measured")
    with pytest.raises(ValueError, match="not one of"):
        en.EnergyReading("x", "gpu", "guessed", 1.0)


def test_the_job_total_is_added_to_the_run_after_the_job(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e"))
    rid = run.info.run_id
    client.set_tag(rid, "energy_quality", "unavailable")
    client.set_tag(rid, "energy_reason", "nvml: no driver; sacct: job 9 is still running")
    run_cmd, _ = _sacct("9|COMPLETED|123456\n")
    en.record_job_energy(uri, rid, "9", run=run_cmd, which=lambda n: "/usr/bin/sacct")
    data = client.get_run(rid).data
    assert data.metrics["energy/total_j"] == 123456 and data.metrics["energy/sacct_j"] == 123456
    assert data.tags["energy_quality"] == "measured" and data.tags["energy_scope"] == "job"
    assert data.tags["energy_reason"] == "nvml: no driver"
    run_cmd, _ = _sacct("9|COMPLETED|0\n")
    r = en.record_job_energy(uri, rid, "9", run=run_cmd, which=lambda n: "/usr/bin/sacct")
    assert r.quality == "unavailable" and "AcctGatherEnergyType" in client.get_run(rid).data.tags["energy.sacct"]
