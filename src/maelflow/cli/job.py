"""maelflow job submit|kill|status: the ECF_JOB_CMD, ECF_KILL_CMD and ECF_STATUS_CMD of every suite.

ecFlow calls these with its own variables; they print what they did on stdout (kept by the server
in the task's log) and exit non-zero with a reason when they fail, which ecFlow shows as the abort.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click



def fail(message: str, code: int = 1) -> None:
    """Plain stderr (no rich): ecFlow runs these commands for every job, start-up time counts."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _rx(config: str):
    # the file maelflow build wrote, read without the config models where it is complete: these
    # commands run once per job (sites/suiteconfig.py)
    from maelflow.sites.suiteconfig import load

    try:
        return load(config)
    except (OSError, ValueError) as exc:
        fail(f"cannot read the suite's resolved config {config}: {exc}")


site_option = click.option("--site", required=True, help="Site the job runs on.")
runner_option = click.option("--runner", type=click.Choice(["site", "login", "local"]), default="site",
                             show_default=True,
                             help="site: the site's scheduler; login: a process on the site's login node; "
                                  "local: a process beside the server (server-side tasks of a site family).")
config_option = click.option("--config", "config", required=True, type=click.Path(dir_okay=False),
                             help="The suite's resolved experiment (experiment.json).")
dry_run_option = click.option("--dry-run", is_flag=True, help="Print the commands, run nothing on the site.")


@click.group("job")
def command() -> None:
    """Job entry points called by the ecFlow server (submit, kill, status)."""


def _child_env(ecf_name, ecf_pass, ecf_tryno, ecf_port, rid=None) -> dict[str, str]:
    """What is needed to act for a task (abort it) from a command the server runs."""
    return {k: v for k, v in {"ECF_NAME": ecf_name, "ECF_PASS": ecf_pass, "ECF_TRYNO": ecf_tryno,
                             "ECF_PORT": ecf_port, "ECF_RID": rid,
                             "ECF_HOST": os.environ.get("MAELFLOW_ECF_HOST", "127.0.0.1")}.items() if v}


ecf_options = [click.option("--ecf-name", default=None), click.option("--ecf-pass", default=None),
               click.option("--ecf-tryno", default=None), click.option("--ecf-port", default=None)]


def with_ecf_options(f):
    for opt in reversed(ecf_options):
        f = opt(f)
    return f


@command.command("submit")
@site_option
@runner_option
@config_option
@dry_run_option
@with_ecf_options
@click.argument("job", type=click.Path(dir_okay=False))
@click.argument("jobout", type=click.Path(dir_okay=False))
def submit(site: str, runner: str, config: str, dry_run: bool, ecf_name, ecf_pass, ecf_tryno, ecf_port,
           job: str, jobout: str) -> None:
    """Submit JOB on the site, its output going to JOBOUT."""
    from maelflow.sites import jobs

    try:
        handle = jobs.submit(_rx(config), site, Path(job), Path(jobout), dry_run=dry_run, runner=runner)
    except Exception as exc:  # noqa: BLE001 - any failure must reach ecFlow as one line
        reason = f"submit to {site} failed: {exc}"
        env = _child_env(ecf_name, ecf_pass, ecf_tryno, ecf_port)
        if env.get("ECF_NAME") and not dry_run:
            # ecFlow's own abort would only say the command failed; abort with the reason instead
            from maelflow.reporting import child_abort

            try:
                child_abort(env, reason)
                click.echo(reason, err=True)
                return
            except RuntimeError:
                pass
        fail(reason)
    click.echo(f"submitted {job} to {site} as {handle.kind} {handle.job_id}")


@command.command("kill")
@site_option
@runner_option
@config_option
@dry_run_option
@with_ecf_options
@click.argument("job", type=click.Path(dir_okay=False))
@click.argument("rid", required=False)
def kill(site: str, runner: str, config: str, dry_run: bool, ecf_name, ecf_pass, ecf_tryno, ecf_port, job: str,
         rid: str | None) -> None:
    """Kill JOB (remote id RID) on the site."""
    from maelflow.sites import jobs

    rx = _rx(config)
    env = _child_env(ecf_name, ecf_pass, ecf_tryno, ecf_port, rid)
    try:
        click.echo(jobs.kill(rx, site, Path(job), rid, env, dry_run=dry_run, runner=runner))
    except Exception as exc:  # noqa: BLE001
        fail(f"kill on {site} failed: {exc}")


@command.command("status")
@site_option
@runner_option
@config_option
@dry_run_option
@click.argument("job", type=click.Path(dir_okay=False))
@click.argument("rid", required=False)
def status(site: str, runner: str, config: str, dry_run: bool, job: str, rid: str | None) -> None:
    """Write what the site knows of JOB to JOB.stat (shown by ecFlow UI) and print it."""
    from maelflow.sites import jobs

    try:
        alive, text = jobs.status(_rx(config), site, Path(job), rid, dry_run=dry_run, runner=runner)
    except Exception as exc:  # noqa: BLE001
        fail(f"status on {site} failed: {exc}")
    if not dry_run:
        Path(job + ".stat").write_text(text + "\n")
    click.echo(text)
    if not alive:
        fail(f"job {job} is not running on {site}")
