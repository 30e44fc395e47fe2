"""maelflow-sandbox is optional: the core finds it only through entry points, works (and says what to
install) without it, and the sandbox's root-run key handling never follows the site user's symlinks."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest

from maelflow import placeholders
from maelflow.config.errors import ConfigError
from maelflow.config.loader import load_experiment
from maelflow.services import stack as stack_mod
from maelflow.services import loopback
from maelflow.services.base import ServiceError
from maelflow.workspace import Workspace
from maelflow_sandbox import hpc

pytestmark = pytest.mark.unit

SITE_UID, SITE_GID = 54321, 54321  # no such user needed: root chowns to numbers


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws")


def test_core_imports_load_no_sandbox_module(tmp_path):
    """Importing the CLI and the config loader imports nothing of the sandbox (the interpreter's
    start-up .pth imports only its torchvision shim); a config load in a workspace without a
    loopback site imports only its placeholder provider, not the site."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "def sandbox(): return sorted(m for m in sys.modules if m.startswith('maelflow_sandbox'))\n"
        "import maelflow.cli.main, maelflow.config.loader, maelflow.services.stack, maelflow.demo\n"
        "print(sandbox())\n"
        "from maelflow.config.loader import load_experiment\n"
        "from maelflow.placeholders import placeholders_for\n"
        "from maelflow.workspace import Workspace\n"
        f"load_experiment('demo', placeholders=placeholders_for(Workspace(Path({str(tmp_path / 'ws')!r}))))\n"
        "print(sandbox())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    imported, loaded = (set(eval(line)) for line in out.splitlines())
    assert imported <= {"maelflow_sandbox", "maelflow_sandbox.tvshim"}
    assert loaded - imported == {"maelflow_sandbox.placeholders"}


def test_the_sandbox_registers_its_service_and_placeholders():
    assert stack_mod.selected(extra=["hpc"])[-2:] == ["hpc", "relay"]     # up before the relay, down after
    assert stack_mod.service_class("hpc") is hpc.LoopbackHpc
    assert any(p.prefix == "hpc_" for p in placeholders.providers())
    assert loopback.preload_env() == {"LD_PRELOAD": str(loopback.SHIM)}


def test_without_the_sandbox_config_loading_works_and_names_the_placeholder(monkeypatch, config_root, ws):
    monkeypatch.setattr(placeholders, "providers", lambda: ())
    values = placeholders.placeholders_for(ws)
    assert set(values) == {"workspace", "maelflow"}
    load_experiment("demo", ["sites=[local]"], config_root=config_root, placeholders=values)
    with pytest.raises(ConfigError) as err:
        load_experiment("demo", ["sites=[localhpc]"], config_root=config_root, placeholders=values)
    text = str(err.value)
    assert "{hpc_port}" in text and "maelflow-sandbox" in text and "pip install -e ./sandbox" in text


def test_without_the_sandbox_hpc_says_what_to_install(monkeypatch):
    monkeypatch.setattr(stack_mod, "_plugins", lambda: {})
    assert "hpc" not in stack_mod.table()
    with pytest.raises(ServiceError, match=
                       "'hpc' service comes with maelflow-sandbox.*pip install -e ./sandbox"):
        stack_mod.selected(extra=["hpc"])


def test_a_missing_or_stale_bind_helper_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setattr(loopback, "SHIM", tmp_path / "bindlo.so")
    with pytest.raises(ServiceError, match=r"is not built.*-m maelflow\.services\.loopback"):
        loopback.preload_env()
    (tmp_path / "bindlo.so").write_bytes(b"")
    os.utime(tmp_path / "bindlo.so", (0, 0))
    with pytest.raises(ServiceError, match="is older than bindlo.c"):
        loopback.preload_env()


# -- install_key / remove_key run as root in a home the site user controls (security review #2) -------
@pytest.fixture
def site(ws, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the key handling chowns to the site user: needs root")
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, SITE_UID, SITE_GID)
    pw = pwd.struct_passwd(("maelhpc", "x", SITE_UID, SITE_GID, "", str(home), "/bin/bash"))
    s = hpc.LoopbackHpc(ws, user="maelhpc")
    s.root.mkdir(parents=True)
    (s.root / "id_ed25519.pub").write_text("ssh-ed25519 AAAAC3NzaTESTBLOB maelflow-hpc-test\n")
    s.passwd = lambda: pw
    return s, pw, home


@pytest.fixture
def outside(tmp_path):
    """A root-owned folder with a secret: what a planted symlink points at."""
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    (d / "secret").write_text("root:hash:secret\n")
    os.chmod(d / "secret", 0o600)
    return d


def snapshot(d):
    """Owner, mode and content of ``d`` and what is in it."""
    def one(p):
        st = p.lstat()
        return st.st_uid, st.st_gid, st.st_mode, p.read_bytes() if p.is_file() else None
    return {p.name: one(p) for p in [d, *d.iterdir()]}


def test_install_and_remove_key_hand_files_to_the_site_user(site):
    s, pw, home = site
    assert s.install_key(pw) is True
    assert s.install_key(pw) is False                               # once
    ak = home / ".ssh" / "authorized_keys"
    assert ak.read_text().count("AAAAC3NzaTESTBLOB") == 1 and "SLURM_CONF=" in ak.read_text()
    for p in (home / ".ssh", ak, home / ".ssh" / ".maelflow.lock"):
        assert (p.stat().st_uid, p.stat().st_gid) == (SITE_UID, SITE_GID)
    assert ak.stat().st_mode & 0o777 == 0o600 and (home / ".ssh").stat().st_mode & 0o777 == 0o700
    assert s.remove_key() is True and s.remove_key() is False
    assert ak.read_text() == ""
    assert [p.name for p in (home / ".ssh").iterdir() if p.name.startswith(".authorized_keys")] == []


@pytest.mark.parametrize("planted", [".ssh", ".ssh/.maelflow.lock", ".ssh/authorized_keys"])
def test_a_planted_symlink_is_refused_and_nothing_outside_is_touched(site, outside, planted):
    s, pw, home = site
    if planted != ".ssh":
        (home / ".ssh").mkdir(mode=0o700)
        os.chown(home / ".ssh", SITE_UID, SITE_GID)
    target = outside if planted == ".ssh" else outside / "secret"
    (home / planted).symlink_to(target)
    before = snapshot(outside)
    with pytest.raises(ServiceError, match="symlink.*refusing"):
        s.install_key(pw)
    with pytest.raises(ServiceError, match="symlink.*refusing"):
        s.remove_key()
    assert snapshot(outside) == before
    assert (home / planted).is_symlink()
    if planted != ".ssh":
        leaked = [p.read_text() for p in (home / ".ssh").iterdir() if p.is_file() and not p.is_symlink()]
        assert not any("secret" in text for text in leaked)


def test_a_hard_link_to_a_file_of_roots_is_refused(site, outside):
    s, pw, home = site
    (home / ".ssh").mkdir(mode=0o700)
    try:
        os.link(outside / "secret", home / ".ssh" / "authorized_keys")
    except OSError:
        pytest.skip("hard links across these folders are not possible here")
    before = snapshot(outside)
    with pytest.raises(ServiceError, match="hard link"):
        s.install_key(pw)
    assert snapshot(outside) == before
