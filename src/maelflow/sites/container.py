"""How a site's maelflow command is called: in the login shell, or through the site's container.

Centres hand out PyTorch as an Apptainer/Singularity image (LUMI's ROCm containers, NGC images on
Leonardo and JUPITER); the site part's virtual environment lives on the shared filesystem and runs
inside it. So every place that starts maelflow on a site (the job header's ``$MAELFLOW``, the login
node's stage, ``site setup`` and ``site check``) asks here for the command, never builds it itself.

The prefix is plain words, not shell-quoted text: the job header expands ``$MAELFLOW`` unquoted, so a
word that would need quoting (a space, a ``$``) is refused when the suite is built, with the field.
"""

from __future__ import annotations

import re

from maelflow.errors import ConfigurationError
from maelflow.sites.site_part import record_path, site_part_command

_PLAIN = re.compile(r"^[A-Za-z0-9_./:,=@+-]+$")


def bound_paths(site) -> list[tuple[str, str]]:
    """(source, destination) of every folder visible read-write in the container: the site's paths
    (jobs, datasets and outputs must be seen at the same path inside), then the profile's binds."""
    seen: list[tuple[str, str]] = []
    for p in (site.paths.root, site.paths.datasets, site.paths.outputs):
        pair = (p.rstrip("/") or "/", p.rstrip("/") or "/")
        if pair not in seen:
            seen.append(pair)
    for b in site.container.binds:
        src, _, dst = b.partition(":")
        dst = dst.split(":", 1)[0] or src
        if (src, dst) not in seen:
            seen.append((src, dst))
    return seen


def prefix(site) -> list[str]:
    """The words in front of the site's maelflow command; empty without a container."""
    c = site.container
    if c is None:
        return []
    if c.runtime in ("apptainer", "singularity"):
        argv = [c.runtime, "exec"]
        if site.gpus.vendor == "nvidia":
            argv.append("--nv")
        elif site.gpus.vendor == "amd":
            argv.append("--rocm")
        for src, dst in bound_paths(site):
            argv += ["--bind", src if src == dst else f"{src}:{dst}"]
        argv += [*c.options, c.image]
    else:   # bubblewrap: the image is a folder mounted read-only as /, the site's paths read-write
        argv = ["bwrap", "--ro-bind", c.image, "/", "--dev-bind", "/dev", "/dev", "--proc", "/proc",
                "--bind", "/tmp", "/tmp", "--die-with-parent"]
        for src, dst in bound_paths(site):
            argv += ["--bind", src, dst]
        argv += [*c.options, "--"]
    bad = [w for w in argv if not _PLAIN.match(w)]
    if bad:
        raise ConfigurationError(f"site {site.name}: container word {bad[0]!r} (container.image, binds or options) "
                                 "needs shell quoting, which the job header cannot carry",
                                 hint="use paths without spaces, quotes or '$' in the container section")
    return argv


def maelflow_of(site) -> str:
    """The maelflow the site's jobs run, as the shell of a job or a login-node command reads it.

    ``maelflow_command`` when the profile pins it; else the site part ``maelflow site setup``
    installs (``<install.venv>/bin/maelflow``). A profile with ``install.fallback_command`` (the
    loopback site: this machine's own installation) runs that until the setup has left its record
    on the site, so the choice is made there, when the command runs: a site set up after the suite
    was built is used from its next job on, with no rebuild and no profile edit.
    """
    if site.maelflow_command:
        return site.maelflow_command
    part = site_part_command(site)
    fallback = site.install.fallback_command
    if not fallback:
        return part
    words = [record_path(site), part, *fallback.split()]
    bad = [w for w in words if not _PLAIN.match(w)]
    if bad:
        raise ConfigurationError(f"site {site.name}: {bad[0]!r} (install.venv or install.fallback_command) needs "
                                 "shell quoting, which the job header cannot carry",
                                 hint="use paths without spaces, quotes or '$'")
    return f"$(test -f {record_path(site)} && echo {part} || echo {fallback})"


def site_command(site) -> str:
    """The site's maelflow command, through its container when it has one."""
    return " ".join([*prefix(site), maelflow_of(site)])


def in_container(site, command: str) -> str:
    """``command`` (plain words, e.g. an interpreter and its arguments) through the site's container."""
    return " ".join([*prefix(site), command])


def job_environment(site) -> list[str]:
    """``export`` lines for the accelerator's variables, in the order the profile gives them."""
    lines = []
    for key, value in site.accelerator.environment.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ConfigurationError(f"site {site.name}: accelerator.environment name {key!r} is not a variable name")
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
        lines.append(f'export {key}="{escaped}"')
    return lines
