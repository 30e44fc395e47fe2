"""``maelflow site setup``: the site part of maelflow in a virtual environment on the site, without root.

Every job on a site runs ``maelflow_command`` there; on LUMI, Leonardo, MareNostrum 5 or JUPITER
there is no root, no Debian package, and on some login nodes no internet. So the site part (job
entry points, reporting, stage, training launch: no server pieces) goes into a virtual environment
under the site's root, made by the site's own interpreter (after its module loads, inside its
container when it has one), pinned to the versions of this installation:

* where the login node reaches the package registry (``internet.login``), the site's pip installs
  from it, with maelflow's own wheels and the pins pushed beside;
* elsewhere the wheels are gathered here (``pip wheel``/``pip download`` from the registry, as on
  a user's laptop, for the site's Python and CPU architecture, cached under the workspace) and
  pushed by rsync over the site's connection; the site's pip then installs with ``--no-index``.

What a site part is made of is ``PARTS`` (the profile's ``install.parts`` choose): maelflow itself
is installed without its server dependencies (ecFlow's Python API, the catalogue service, MLflow's
server), which is why its own wheels go in with ``--no-deps``. The result is recorded beside the
environment (``maelflow-site.json``: what was asked, what pip installed) and checked by running the
new environment's ``maelflow site info``: the same version, and the same code (a digest of the
package files), as here. A second run with nothing changed only reads the record. The record is
written last, so its presence is what tells a job's shell that the site part is there (a profile
with ``install.fallback_command`` runs that until then: ``container.maelflow_of``). The profile may
add distributions (``install.packages``; one installed here from a checkout is built from it, like
maelflow's own) and start-up modules (``install.startup``, one .pth file in the environment).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Callable

from maelflow.errors import SiteError
from maelflow.sites.site_part import RECORD, record_path, site_part_command, venv_path  # noqa: F401 - also setup's API

# what each part of the site part needs beside maelflow's own wheels (maelflow, maelflow-transfer),
# pinned to this installation's versions
PARTS: dict[str, list[str]] = {
    "core": ["pydantic", "hydra-core", "omegaconf", "pyyaml", "click", "rich", "requests", "obstore", "blake3", "numpy",
             "zarr"],
    "train": ["torch", "pytorch-lightning", "mlflow-skinny"],
    "anemoi": ["anemoi-training", "anemoi-graphs[tri]", "anemoi-datasets", "anemoi-models", "xarray", "netCDF4"],
}
# maelflow's own distributions: (import name, folder of its pyproject.toml in a checkout)
# (maelflow-registry: its package only, which the workspace's paths come from; its server's
# dependencies stay off the site)
OWN = {"maelflow": ("maelflow", "."), "maelflow-transfer": ("maelflow_transfer", "transfer"),
       "maelflow-registry": ("maelflow_registry", "registry")}
PIN_SKIP = {"ecflow", "pip", "setuptools", "wheel"}


class SiteInstallError(SiteError):
    """The site part is missing, differs from this installation, or could not be installed."""


# ------------------------------------------------------------------------------------- this side
def _package_dir(import_name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise SiteInstallError(f"the package {import_name} is not installed here")
    return Path(list(spec.submodule_search_locations)[0])


def _package_files(top: Path) -> list[Path]:
    """The .py files a wheel of ``top`` holds: regular packages only (a folder with __init__.py),
    as setuptools' package discovery finds them, so a checkout and its installed wheel agree."""
    out: list[Path] = []
    stack = [top]
    while stack:
        d = stack.pop()
        if not (d / "__init__.py").is_file():
            continue
        for p in d.iterdir():
            if p.is_dir() and p.name != "__pycache__":
                stack.append(p)
            elif p.suffix == ".py":
                out.append(p)
    return out


@cache
def code_digest() -> str:
    """SHA-256 over maelflow's and maelflow-transfer's package files (relative path and content):
    equal versions of a checkout can hold different code, which a site must not run unnoticed."""
    h = hashlib.sha256()
    for _, (import_name, _) in sorted(OWN.items()):
        top = _package_dir(import_name)
        for p in sorted(_package_files(top), key=lambda q: q.relative_to(top).as_posix()):
            h.update(f"{import_name}/{p.relative_to(top).as_posix()}\0".encode())
            h.update(p.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def describe() -> dict[str, object]:
    """This installation, as ``maelflow site info --json`` prints it (here and on a site)."""
    return {**{d: _version(d) for d in OWN}, "digest": code_digest(), "python": platform.python_version(),
            "arch": platform.machine(),
            "torch": _version("torch"), "prefix": sys.prefix}


def same_installation(theirs: dict, ours: dict | None = None) -> list[str]:
    """What differs between a site's ``describe()`` and ours (empty: the same)."""
    ours = ours or describe()
    return [f"{k} {theirs.get(k)} (here {ours.get(k)})" for k in (*OWN, "digest")
            if theirs.get(k) != ours.get(k)]


def pins() -> dict[str, str]:
    """name -> version of every distribution this environment uses (the first one on sys.path of a
    name, as imports see it), maelflow's own and editable ones left out."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if not name or name in out:
            continue
        direct = dist.read_text("direct_url.json") or ""
        out[name] = "" if ('"editable": true' in direct or name in OWN or name in PIN_SKIP) else dist.version
    return {k: v for k, v in sorted(out.items()) if v}


def _base(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def torch_pin(site, here: dict[str, str]) -> str | None:
    """``torch==<this installation's release>+<the site's variant>``: the same release, built for
    the site's accelerator."""
    version = here.get("torch")
    if not version:
        return None
    return f"torch=={version.split('+', 1)[0]}+{site.accelerator.torch_variant}"


def constraints_text(site) -> str:
    here = pins()
    lines = [f"{k}=={v}" for k, v in here.items() if k != "torch"]
    tp = torch_pin(site, here)
    if tp:
        lines.append(tp)
    return "# maelflow site setup: the versions of the installation that set this site up\n" + "\n".join(lines) + "\n"


def requirements(site) -> list[str]:
    """What the site's pip installs from the registry or the pushed wheels: the parts, and the
    profile's packages that are not built here from a checkout."""
    reqs: list[str] = []
    for part in site.install.parts:
        reqs += [r for r in PARTS[part] if r not in reqs]
    local = local_sources(site)
    return reqs + [p for p in site.install.packages if _base(p) not in local and p not in reqs]


def _source_dir(dist: str) -> Path | None:
    """The source folder ``dist`` is installed from here when it is an editable checkout, else None."""
    from urllib.parse import unquote, urlsplit

    try:
        found = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return None
    try:
        direct = json.loads(found.read_text("direct_url.json") or "{}")
    except ValueError:
        return None
    url = urlsplit(direct.get("url", ""))
    if url.scheme == "file" and direct.get("dir_info", {}).get("editable"):
        return Path(unquote(url.path))
    return None


def local_sources(site) -> dict[str, Path]:
    """The profile's ``install.packages`` installed here from a checkout: built into wheels from it,
    installed with --no-deps like maelflow's own (a plugin's dependencies are maelflow's)."""
    out = {}
    for p in site.install.packages:
        src = _source_dir(_base(p))
        if src is not None and (src / "pyproject.toml").is_file():
            out[_base(p)] = src
    return out


STARTUP_PTH = "zz_maelflow_startup.pth"


def resolve_command(conn, site) -> tuple[str, str]:
    """(the maelflow the site's jobs run now, why that one): the job shell's own choice
    (``container.maelflow_of``), evaluated over the site's connection for check's and deploy's messages."""
    from maelflow.sites.container import maelflow_of

    if site.maelflow_command:
        return site.maelflow_command, "maelflow_command of the profile"
    chosen = maelflow_of(site)
    if chosen != site_part_command(site):    # a choice the shell makes when the job runs: make it there now
        chosen = conn.run(f"echo {chosen}", check=False, timeout=60).stdout.strip()
    if chosen == site_part_command(site):
        return chosen, "the site part"
    return chosen, "install.fallback_command: site setup has not run"


def checkout_root() -> Path | None:
    """The source checkout this maelflow runs from (an editable install), else None."""
    root = _package_dir("maelflow").parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / OWN["maelflow-transfer"][1]).is_dir() else None


def build_own_wheels(dest: Path, run: Callable[[list[str]], None], extra: dict[str, Path] | None = None) -> list[Path]:
    """maelflow's own wheels (maelflow, maelflow-transfer, maelflow-registry) from this checkout, and
    those of ``extra`` (name -> source folder), built from a copy of their sources (a build never
    writes into the checkout). Empty when maelflow is not a checkout (its releases come from the registry)."""
    root = checkout_root()
    sources = {dist: root / folder for dist, (_, folder) in OWN.items()} if root is not None else {}
    if not sources:
        return []
    sources.update(extra or {})
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="maelflow-wheel-") as tmp:
        for dist, src in sorted(sources.items()):
            copy = Path(tmp) / dist
            copy.mkdir()
            for name in ("pyproject.toml", "README.md", "LICENSE"):
                if (src / name).is_file():
                    shutil.copy2(src / name, copy / name)
            shutil.copytree(src / "src", copy / "src",
                            ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "*.pyc"))
            run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest),
                 str(copy)])
    return sorted(dest.glob("*.whl"))


# ------------------------------------------------------------------------------------- the site
def _lines(site, command: str) -> str:
    """``command`` after the site's environment lines, as a job would run it."""
    return "\n".join([*site.environment, command])


class SiteSetup:
    """One site's part: probe the interpreter, gather and push wheels, install, verify, record."""

    def __init__(self, ws, name: str, site, *, say: Callable[[str], None] = print, dry_run: bool = False):
        from maelflow.sites.connections import connect, is_local

        self.ws, self.name, self.site, self.say = ws, name, site, say
        self.local = is_local(site)
        self.conn = connect(name, site, dry_run=dry_run)
        self.venv = venv_path(site)
        self.remote_root = f"{site.paths.root.rstrip('/')}/.maelflow/wheels"

    # -- questions ----------------------------------------------------------------------------
    def probe(self) -> dict[str, str]:
        """The site's interpreter (after its module loads, in its container): Python version, arch."""
        from maelflow.sites.container import in_container

        code = "import platform, sys; print(platform.python_version(), platform.machine())"
        res = self.conn.run(_lines(self.site, f"{in_container(self.site, self.site.install.python)} -c "
                                   f"{shlex.quote(code)}"), check=False, timeout=120)
        words = res.stdout.split()
        if res.rc != 0 or len(words) < 2:
            raise SiteInstallError(
                f"site {self.name}: cannot run {self.site.install.python!r} on {self.conn.target}: "
                f"{(res.stderr or res.stdout).strip()[-300:]}",
                hint="set install.python (and the module loads in 'environment') in the site profile")
        version, arch = words[-2], words[-1]
        if arch != self.site.accelerator.arch:
            raise SiteInstallError(f"site {self.name}: its python runs on {arch}, the profile says "
                                   f"accelerator.arch={self.site.accelerator.arch}",
                                   hint=f"set accelerator.arch: {arch} in configs/sites/{self.name}.yaml")
        return {"python": ".".join(version.split(".")[:2]), "arch": arch}

    def info(self, command: str) -> dict | None:
        """``describe()`` of the maelflow ``command`` on the site (through its container), None when it
        does not run."""
        return remote_info(self.conn, self.site, command)

    def record(self) -> dict | None:
        try:
            return json.loads(self.conn.read_bytes(record_path(self.site)))
        except (FileNotFoundError, ValueError, SiteError):
            return None

    # -- the work -----------------------------------------------------------------------------
    def wanted(self, plat: dict[str, str], names: set[str] | None = None) -> dict[str, object]:
        """What an installation is asked for. ``names``: the packages the site part holds, whose pins
        count (a package installed here and not there does not make the site part outdated)."""
        pinned = [ln for ln in constraints_text(self.site).splitlines()[1:]
                  if names is None or _base(ln) in names]
        return {**{d: _version(d) for d in OWN}, "digest": code_digest(), "parts": list(self.site.install.parts),
                "requirements": requirements(self.site), "arch": plat["arch"], "python": plat["python"],
                "torch_variant": self.site.accelerator.torch_variant,
                "packages": list(self.site.install.packages), "startup": list(self.site.install.startup),
                "constraints": hashlib.sha256("\n".join(pinned).encode()).hexdigest()[:16]}

    def run(self, force: bool = False) -> dict[str, object]:
        if self.local:
            return {"site": self.name, "status": "local",
                    "message": f"{self.name} is this machine: its jobs run this installation; nothing to install"}
        self.conn.check()
        plat = self.probe()
        command = site_part_command(self.site)
        old = self.record()
        held = {_base(n) for n in (old or {}).get("installed", {})} or None
        wanted = self.wanted(plat, held)
        if not force and old and old.get("wanted") == wanted:
            info = self.info(command)
            if info and not same_installation(info):
                self.say(f"{self.name}: the site part in {self.venv} is up to date (maelflow {info['maelflow']}, "
                         f"code {info['digest']})")
                return {"site": self.name, "status": "unchanged", "venv": self.venv, "record": old,
                        **self._command_note(command)}
        if old and isinstance(old.get("wanted"), dict):
            changed = sorted(k for k in {*wanted, *old["wanted"]} if wanted.get(k) != old["wanted"].get(k))
            if changed:
                self.say(f"{self.name}: installing again: {', '.join(changed)} changed since the last setup")
        online = self.site.internet.login
        clock = time.monotonic()
        seconds: dict[str, float] = {}

        def lap(name: str) -> None:
            nonlocal clock
            now = time.monotonic()
            seconds[name] = round(now - clock, 1)
            clock = now

        folder = self.gather(plat, online)
        lap("gather")
        remote = f"{self.remote_root}/{folder.name}"
        self.say(f"{self.name}: pushing {_size(folder)} to {self.conn.target}:{remote}")
        push_folder(self.conn, folder, remote)
        lap("push")
        self.install(remote, online)
        lap("install")
        info = self.info(command)
        if info is None:
            raise SiteInstallError(f"site {self.name}: {command} does not run after the installation",
                                   hint=f"look at the output of: {command} site info --json (on the site)")
        diff = same_installation(info)
        if diff:
            raise SiteInstallError(f"site {self.name}: the installed site part differs from this one: {', '.join(diff)}")
        installed = self.installed_packages()
        rec = {"wanted": self.wanted(plat, {_base(n) for n in installed} or None), "info": info,
               "installed": installed, "source": "registry" if online else "pushed wheels", "wheels": remote,
               "installed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "installed_from": platform.node(), "seconds": seconds, "pushed_bytes": _bytes(folder)}
        self.conn.put_text(record_path(self.site), json.dumps(rec, indent=2, sort_keys=True) + "\n", mode=0o644)
        self.say(f"{self.name}: site part installed in {self.venv}: maelflow {info['maelflow']}, torch {info['torch']}, "
                 f"{len(installed)} packages ({rec['source']})")
        return {"site": self.name, "status": "installed", "venv": self.venv, "record": rec, **self._command_note(command)}

    def _command_note(self, command: str) -> dict[str, str]:
        """Jobs use the site part unless the profile pins another maelflow: say so, and how to undo it."""
        if not self.site.maelflow_command or self.site.maelflow_command == command:
            return {}
        return {"note": f"jobs on {self.name} run {self.site.maelflow_command} (maelflow_command of the profile), "
                        f"not this site part: remove maelflow_command from configs/sites/{self.name}.yaml to "
                        f"use {command}"}

    def gather(self, plat: dict[str, str], online: bool) -> Path:
        """The folder pushed to the site: constraints, requirements, maelflow's own wheels and, for a
        login node without internet, every other wheel (kept under the workspace between runs)."""
        key = f"cp{plat['python'].replace('.', '')}-{plat['arch']}-{self.site.accelerator.torch_variant}"
        folder = self.ws.path("site-wheels", key)
        wheels = folder / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        (folder / "constraints.txt").write_text(constraints_text(self.site))
        reqs = requirements(self.site)
        own = build_own_wheels(folder / "own", self._pip, local_sources(self.site))
        if not own:     # installed from wheels, not a checkout: the same releases from the registry
            self._pip([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder / "own"),
                       *(f"{d}=={_version(d)}" for d in sorted(OWN))])
        (folder / "requirements.txt").write_text("\n".join(reqs) + "\n")
        if online:
            shutil.rmtree(wheels)
            wheels.mkdir()
            return folder
        self.say(f"{self.name}: gathering wheels for {key} in {wheels}")
        base = ["--find-links", str(wheels), "--find-links", str(folder / "own"),
                "-c", str(folder / "constraints.txt"), "-r", str(folder / "requirements.txt")]
        if self.site.accelerator.torch_index:
            base += ["--extra-index-url", self.site.accelerator.torch_index]
        transfer_req = ["maelflow-transfer"]     # found among maelflow's own wheels, for its dependencies
        native = plat["python"] == "{}.{}".format(*sys.version_info[:2]) and plat["arch"] == platform.machine()
        if native:
            argv = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), *base, *transfer_req]
            # everything already gathered by an earlier run: no registry round trips
            if subprocess.run([*argv, "--no-index"], capture_output=True).returncode != 0:
                self._pip(argv)
        else:
            self._foreign(plat, wheels, base + transfer_req)
        return folder

    def _foreign(self, plat: dict[str, str], wheels: Path, args: list[str]) -> None:
        """Wheels for another Python or architecture: binary wheels for the site's platform; a
        package published only as source is built here, and must turn out pure Python."""
        py = plat["python"].replace(".", "")
        tags = [f"--platform={t}_{plat['arch']}" for t in ("manylinux_2_28", "manylinux_2_17", "manylinux2014")]
        argv = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", *tags,
                f"--python-version={plat['python']}", "--implementation=cp", f"--abi=cp{py}", "-d", str(wheels), *args]
        for _ in range(20):
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode == 0:
                return
            m = re.search(r"No matching distribution found for ([A-Za-z0-9_.\-]+)", proc.stderr)
            if not m:
                raise SiteInstallError(f"site {self.name}: pip download for {plat} failed: {proc.stderr.strip()[-800:]}")
            name = m.group(1)
            pin = pins().get(name.lower().replace("_", "-"))
            before = set(wheels.glob("*.whl"))
            self._pip([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                       f"{name}=={pin}" if pin else name])
            made = set(wheels.glob("*.whl")) - before
            if not made or not all(p.name.endswith("-none-any.whl") for p in made):
                raise SiteInstallError(f"site {self.name}: {name} has no wheel for {plat['arch']} Python {plat['python']}",
                                       hint="set internet.login: true if the login node reaches the registry, or "
                                            "install it from the site's modules or container")
        raise SiteInstallError(f"site {self.name}: too many packages without wheels for {plat}")

    def _pip(self, argv: list[str]) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SiteInstallError(f"site {self.name}: {' '.join(argv[2:5])} ... failed here: "
                                   f"{proc.stderr.strip()[-1200:]}")

    def install(self, remote: str, online: bool) -> None:
        from maelflow.sites.container import in_container

        site, venv = self.site, self.venv
        vpy = f"{venv}/bin/python"
        q = shlex.quote
        pip = f"{in_container(site, vpy)} -m pip install --no-compile --disable-pip-version-check"
        if online:
            pip_env = ""
            source = f"--find-links {q(remote)}/own"
            if site.accelerator.torch_index:
                source += f" --extra-index-url {q(site.accelerator.torch_index)}"
        else:   # the login node has no registry: what was pushed, and nothing this machine's pip config names
            pip_env = "PIP_CONFIG_FILE=/dev/null "
            source = f"--no-index --find-links {q(remote)}/wheels --find-links {q(remote)}/own"
        own = f"{q(remote)}/own/*.whl"
        purelib = q("import sysconfig; print(sysconfig.get_path('purelib'))")
        script = "\n".join([
            "set -e",
            f"if [ ! -x {q(vpy)} ]; then {in_container(site, site.install.python)} -m venv {q(venv)}; fi",
            f"{pip_env}{pip} -q {source} -c {q(remote)}/constraints.txt -r {q(remote)}/requirements.txt",
            # maelflow without its server dependencies; same version, maybe other code: always replaced
            f"if ls {own} >/dev/null 2>&1; then {pip_env}{pip} -q --no-index --no-deps --force-reinstall {own}; fi",
            # the profile's start-up modules: one .pth in the environment, rewritten (or removed) each time
            f"sp=$({in_container(site, vpy)} -c {purelib})",
            (f"printf '%s\\n' {' '.join(q('import ' + m) for m in site.install.startup)} > \"$sp/{STARTUP_PTH}\""
             if site.install.startup else f"rm -f \"$sp/{STARTUP_PTH}\""),
        ])
        self.say(f"{self.name}: installing into {venv} ({'from the registry' if online else 'from the pushed wheels'})")
        res = self.conn.run(_lines(site, script), check=False, timeout=3600)
        if res.rc != 0:
            raise SiteInstallError(f"site {self.name}: the installation into {venv} failed (rc {res.rc}): "
                                   f"{(res.stderr or res.stdout).strip()[-1500:]}")

    def installed_packages(self) -> dict[str, str]:
        from maelflow.sites.container import in_container

        res = self.conn.run(_lines(self.site, f"{in_container(self.site, self.venv + '/bin/python')} -m pip list "
                                   "--format=json --disable-pip-version-check"), check=False, timeout=120)
        try:
            return {d["name"]: d["version"] for d in json.loads(res.stdout)}
        except (ValueError, KeyError, TypeError):
            return {}


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _size(folder: Path) -> str:
    return f"{_bytes(folder) / 1e6:.0f} MB"


def push_folder(conn, local: Path, remote: str) -> None:
    """``local``'s files into ``remote`` on the site, by rsync over the site's own SSH connection
    (unchanged files are skipped, files gone here are deleted there)."""
    conn.makedirs(remote)
    if getattr(conn, "local", False) or not hasattr(conn, "ssh_command"):
        for p in sorted(local.rglob("*")):
            if p.is_file():
                conn.put_file(str(p), f"{remote}/{p.relative_to(local).as_posix()}")
        return
    rsh = " ".join(shlex.quote(a) for a in conn.ssh_command())
    dest = remote if remote.startswith("/") else remote.removeprefix("~/")
    argv = ["rsync", "-rt", "--delete", "-e", rsh, f"{local}/", f"{conn.host}:{dest}/"]
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SiteInstallError(f"rsync of {local} to {conn.target}:{remote} failed (rc {proc.returncode}): "
                               f"{proc.stderr.strip()[-500:]}")


def remote_info(conn, site, command: str) -> dict | None:
    """``describe()`` of the maelflow ``command`` on the site, through its container; None when it
    does not run or says nothing readable."""
    from maelflow.sites.container import in_container

    res = conn.run(_lines(site, f"{in_container(site, command)} site info --json"), check=False, timeout=120)
    for line in reversed(res.stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "maelflow" in data:
            return data
    return None


def require_site_part(name: str, site) -> None:
    """For deploy: the maelflow the site's jobs run is this installation's version and code, or
    a ``SiteInstallError`` with the command that fixes it. A local site runs this installation."""
    from maelflow.sites.connections import connect, is_local

    if is_local(site):
        return
    conn = connect(name, site)
    command, why = resolve_command(conn, site)
    info = remote_info(conn, site, command)
    fix = f"maelflow site setup {name}"
    if info is None:
        raise SiteInstallError(f"site {name}: its maelflow {command} ({why}) does not run on {conn.target}: "
                               "maelflow is not installed there",
                               hint=f"run '{fix}', then 'maelflow site check {name}'")
    diff = same_installation(info)
    if diff:
        raise SiteInstallError(f"site {name}: its maelflow {command} ({why}) is not this one: {', '.join(diff)}",
                               hint=f"run '{fix}' to install this version there")


def setup_site(ws, name: str, site, *, force: bool = False, say: Callable[[str], None] = print) -> dict[str, object]:
    return SiteSetup(ws, name, site, say=say).run(force=force)


__all__ = ["PARTS", "RECORD", "SiteInstallError", "SiteSetup", "code_digest", "constraints_text", "describe",
           "pins", "record_path", "remote_info", "require_site_part", "requirements", "resolve_command",
           "same_installation", "setup_site", "site_part_command", "venv_path"]

