"""The site profile's container, accelerator and install sections, and `site check`/`site setup` logic that
needs no service: the container prefix, the pins, what differs between installations, and the check's
items on this machine (a local site)."""

from __future__ import annotations

import json
import socket

import pytest
from click.testing import CliRunner

from maelflow.config.models import Site
from maelflow.errors import ConfigurationError
from maelflow.sites import setup
from maelflow.sites.check import FAILED, OK, SiteCheck, reachable_here
from maelflow.sites.container import job_environment, maelflow_of, prefix, site_command
from maelflow.workspace import Workspace

pytestmark = pytest.mark.unit


def make_site(**extra) -> Site:
    data = {"name": "s", "scheduler": "slurm", "slurm": {"partition": "p"},
            "connection": {"type": "ssh", "ssh": {"host": "login.example"}},
            "paths": {"root": "/scratch/u/mf", "datasets": "/project/ds", "outputs": "/scratch/u/mf/out"},
            "maelflow_command": "/scratch/u/mf/venv/bin/maelflow"}
    data.update(extra)
    return Site.model_validate(data)


def test_apptainer_prefix_binds_the_site_paths_and_asks_for_the_vendors_gpus():
    site = make_site(gpus={"vendor": "amd", "per_node": 8},
                     container={"image": "/appl/pytorch.sif", "binds": ["/flash/p:/data"], "options": ["--cleanenv"]})
    assert prefix(site) == ["apptainer", "exec", "--rocm", "--bind", "/scratch/u/mf", "--bind", "/project/ds",
                            "--bind", "/scratch/u/mf/out", "--bind", "/flash/p:/data", "--cleanenv", "/appl/pytorch.sif"]
    nvidia = make_site(gpus={"vendor": "nvidia", "per_node": 4},
                       container={"image": "/x.sif", "runtime": "singularity"})
    assert prefix(nvidia)[:3] == ["singularity", "exec", "--nv"]
    assert site_command(nvidia).endswith(" /x.sif /scratch/u/mf/venv/bin/maelflow")


def test_bwrap_prefix_mounts_the_image_read_only_and_the_site_paths_read_write():
    site = make_site(container={"image": "/", "runtime": "bwrap", "binds": ["/tmp/extra"]})
    words = prefix(site)
    assert words[:4] == ["bwrap", "--ro-bind", "/", "/"] and words[-1] == "--"
    assert "--die-with-parent" in words
    binds = [tuple(words[i + 1:i + 3]) for i, w in enumerate(words) if w == "--bind"]
    assert ("/scratch/u/mf", "/scratch/u/mf") in binds and ("/tmp/extra", "/tmp/extra") in binds
    assert make_site().container is None and prefix(make_site()) == []
    assert site_command(make_site()) == "/scratch/u/mf/venv/bin/maelflow"


def test_a_container_word_the_job_header_cannot_carry_is_refused_with_the_fields():
    site = make_site(container={"image": "/my images/torch.sif"})
    with pytest.raises(ConfigurationError, match="container.image, binds or options"):
        prefix(site)


def test_accelerator_environment_is_exported_in_order_and_names_are_checked():
    site = make_site(accelerator={"environment": {"A": "/tmp/$USER-x", "B": '$A "q"'}})
    assert job_environment(site) == ['export A="/tmp/$USER-x"', 'export B="$A \\"q\\""']
    with pytest.raises(ConfigurationError, match="not a variable name"):
        job_environment(make_site(accelerator={"environment": {"1BAD": "x"}}))
    with pytest.raises(ValueError, match="torch_variant"):
        make_site(accelerator={"torch_variant": "cuda12"})


def test_the_suite_runs_a_remote_sites_maelflow_through_its_container(tmp_path):
    from maelflow.config.loader import ResolvedExperiment
    from maelflow.suite.builder import site_command as builder_command, site_header

    site = make_site(container={"image": "/x.sif"}, accelerator={"environment": {"NCCL_DEBUG": "WARN"}})
    rx = ResolvedExperiment.__new__(ResolvedExperiment)
    object.__setattr__(rx, "sites", {"s": site})
    assert builder_command(rx, "s").startswith("apptainer exec --bind /scratch/u/mf ")
    assert site_header(rx, "s").splitlines()[-1] == 'export NCCL_DEBUG="WARN"'


def test_the_profiles_name_their_accelerator_and_run_the_site_part(tmp_path):
    from maelflow.datasets.settings import load_site

    ws = Workspace(tmp_path / "ws")
    lumi = load_site("lumi", ws)
    assert lumi.accelerator.torch_variant.startswith("rocm") and "MIOPEN_USER_DB_PATH" in lumi.accelerator.environment
    assert load_site("jupiter", ws).accelerator.arch == "aarch64"
    for name in ("lumi", "leonardo", "jupiter", "marenostrum5"):
        s = load_site(name, ws)
        # nothing pinned: the jobs run the site part, wherever install.venv puts it
        assert s.maelflow_command is None and s.install.fallback_command is None
        assert maelflow_of(s) == setup.site_part_command(s) == f"{s.paths.root}/venv/bin/maelflow"
        moved = s.model_copy(update={"install": s.install.model_copy(update={"venv": "/elsewhere/mf"})})
        assert maelflow_of(moved) == "/elsewhere/mf/bin/maelflow"


class FakeConn:
    """Runs a command as the site's shell would, with the site's paths moved here (``moved``: site
    path -> local path). The real connection is exercised in tests/integration/test_site_setup.py."""

    def __init__(self, moved: dict[str, str] | None = None):
        self.moved, self.commands = dict(moved or {}), []

    def run(self, command, check=True, timeout=None):
        import subprocess
        from types import SimpleNamespace

        self.commands.append(command)
        for site_path, here in self.moved.items():
            command = command.replace(site_path, here)
        res = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout)
        return SimpleNamespace(rc=res.returncode, stdout=res.stdout, stderr=res.stderr)


def test_before_setup_a_fallback_runs_and_after_it_the_site_part_with_no_profile_edit(tmp_path):
    import subprocess

    site = make_site(maelflow_command=None, install={"fallback_command": "/srv/mf/bin/maelflow"})
    record = "/scratch/u/mf/venv/maelflow-site.json"
    assert setup.record_path(site) == record
    # the job's shell chooses: its header carries the test, not a choice made when the suite was built
    expr = maelflow_of(site)
    assert record in expr and "/scratch/u/mf/venv/bin/maelflow" in expr and "/srv/mf/bin/maelflow" in expr
    written = tmp_path / "maelflow-site.json"
    written.write_text("{}")
    for present, wanted in (([], "/srv/mf/bin/maelflow"), ([record], "/scratch/u/mf/venv/bin/maelflow")):
        # the shell expression as the site's shell runs it, with the record's path moved here
        shell = expr.replace(record, str(written) if present else str(tmp_path / "none.json"))
        out = subprocess.run(["bash", "-c", f'echo "{shell}"'], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == wanted
        # check and deploy choose the same over the site's connection, and say why
        command, why = setup.resolve_command(FakeConn({record: str(written) if present else str(tmp_path / "none.json")}),
                                             site)
        assert command == wanted and (("fallback" in why) == (not present))
    # a pinned command is used as it is, without asking the site
    pinned = make_site()
    conn = FakeConn()
    assert setup.resolve_command(conn, pinned) == ("/scratch/u/mf/venv/bin/maelflow", "maelflow_command of the profile")
    assert conn.commands == [] and maelflow_of(pinned) == pinned.maelflow_command
    with pytest.raises(ConfigurationError, match="install.fallback_command"):
        maelflow_of(make_site(maelflow_command=None, install={"fallback_command": "/srv/$USER/maelflow"}))


def test_pins_are_this_installations_and_torch_is_built_for_the_sites_accelerator(tmp_path):
    here = setup.pins()
    assert "maelflow" not in here and "pip" not in here and here["torch"].startswith("2.13.0")
    rocm = make_site(accelerator={"torch_variant": "rocm6.4"})
    text = setup.constraints_text(rocm)
    assert "torch==2.13.0+rocm6.4" in text.splitlines() and f"pydantic=={here['pydantic']}" in text.splitlines()
    assert setup.requirements(make_site(install={"parts": ["core"]})) == setup.PARTS["core"]
    both = setup.requirements(make_site(install={"parts": ["core", "train"]}))
    assert "torch" in both and "anemoi-training" not in both
    assert setup.venv_path(make_site()) == "/scratch/u/mf/venv"
    assert setup.venv_path(make_site(install={"venv": f"{tmp_path}/mf-venv/"})) == f"{tmp_path}/mf-venv"


def test_profile_packages_from_this_checkout_are_built_here_and_others_pinned_from_the_registry():
    site = make_site(install={"parts": ["core"], "packages": ["maelflow-sandbox", "maelflow-testsched", "somepkg"],
                              "startup": ["maelflow_sandbox.tvshim"]})
    local = setup.local_sources(site)
    # installed here as editable checkouts: their wheels are built from the checkout, not asked of pip
    assert set(local) == {"maelflow-sandbox", "maelflow-testsched"}
    assert all((src / "pyproject.toml").is_file() for src in local.values())
    assert setup.requirements(site) == [*setup.PARTS["core"], "somepkg"]
    with pytest.raises(ValueError, match="not a module name"):
        make_site(install={"startup": ["import os; os.system('x')"]})


def test_installations_compare_by_version_and_code():
    ours = setup.describe()
    assert ours["digest"] == setup.code_digest() and len(ours["digest"]) == 16
    assert setup.same_installation(dict(ours), ours) == []
    diff = setup.same_installation({**ours, "digest": "0" * 16, "maelflow": "0.0.1"}, ours)
    assert [d.split()[0] for d in diff] == ["maelflow", "digest"]
    out = CliRunner().invoke(__import__("maelflow.cli.main", fromlist=["cli"]).cli, ["site", "info", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["digest"] == ours["digest"]


def test_check_of_a_local_site_names_an_unwritable_path_and_a_missing_s3_with_fixes(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    site = Site.model_validate({"name": "here", "scheduler": "local", "connection": {"type": "local"},
                                "paths": {"root": str(tmp_path / "root"), "datasets": str(blocker / "ds"),
                                          "outputs": str(tmp_path / "out")}})
    check = SiteCheck(Workspace(tmp_path / "ws"), "here", site, job=False)
    items = {i.name: i for i in check.run()}
    assert items["login"].status == OK and items["scheduler"].status == OK
    assert items["paths.root"].status == OK and "GiB free" in items["paths.root"].detail
    bad = items["paths.datasets"]
    assert bad.status == FAILED and str(blocker / "ds") in bad.detail and "paths.datasets" in bad.fix
    assert items["s3"].status == FAILED and "maelflow services up" in items["s3"].fix
    assert not check.ok and "compute node" not in items


def test_an_unreachable_endpoint_says_why():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]      # bound, never listening: refused
        assert reachable_here(f"http://127.0.0.1:{port}")
        s.listen()
        assert reachable_here(f"http://127.0.0.1:{port}") is None
