"""Deploying suites to an ecFlow server and reading them back as a tree.

``deploy`` loads a new suite or replaces an existing one, then begins it; ``tree`` turns the
server's view into plain data (path, state, labels, meters, events, children), which both the
terminal view and ``maelflow status --json`` render.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from maelflow.errors import MaelflowError
from maelflow.config.loader import ResolvedExperiment
from maelflow.resubmit import resubmissions_left
from maelflow.suite.builder import BuiltSuite, build_suite
from maelflow.workspace import Workspace


class SuiteError(MaelflowError):
    pass


def deploy(rx: ResolvedExperiment, ws: Workspace, client, out_dir: Path | None = None) -> BuiltSuite:
    from maelflow.suite.prepare import prepare_site
    from maelflow.suite.builder import CONFIG_FILE

    from maelflow.services.profile import check_experiment

    check_experiment(ws, rx.experiment.services, Path(rx.config_root) if rx.config_root else None)
    built = build_suite(rx, out_dir or ws.suites_dir / rx.name, ws, ecf_host=_ecf_host(ws))
    (built.out_dir / "jobs").mkdir(exist_ok=True)
    from maelflow.sites.setup import require_site_part

    for site in rx.experiment.sites:
        # refused before anything is queued: the site's maelflow must be this version and code
        require_site_part(site, rx.sites[site])
        prepare_site(rx, site, built.out_dir / CONFIG_FILE, ws)
    client.sync_local()
    defs = client.get_defs()
    exists = defs is not None and defs.find_suite(built.name) is not None
    if exists:
        # a replaced suite keeps running (begun): beginning it again would submit its first tasks a
        # second time, and the first copies would hang as zombies
        client.replace(f"/{built.name}", str(built.def_file), True, True)
    else:
        client.load(str(built.def_file))
    # each deploy is a new run of the experiment: its trainings write under their own folder, and a
    # resubmitted or requeued job of this deploy continues there (not part of the .def: a build of
    # the same config stays byte-identical)
    try:
        client.alter(f"/{built.name}", "add", "variable", DEPLOY_ID_VAR, deploy_id())
    except RuntimeError:  # already there
        client.alter(f"/{built.name}", "change", "variable", DEPLOY_ID_VAR, deploy_id())
    client.sync_local()
    if not client.get_defs().find_suite(built.name).begun():
        client.begin_suite(built.name)
    return built


DEPLOY_ID_VAR = "MAELFLOW_DEPLOY_ID"


def _ecf_host(ws: Workspace) -> str:
    """Where jobs find the ecFlow server: an external one's host (services profile), else loopback."""
    from maelflow.services.profile import current

    section = current(ws).ecflow
    return section.host if section.mode == "external" and section.host else "127.0.0.1"


def deploy_id() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")


def suites(client) -> list[str]:
    client.sync_local()
    defs = client.get_defs()
    return [s.name() for s in defs.suites] if defs else []


def _node(node) -> dict[str, Any]:
    import ecflow

    data: dict[str, Any] = {
        "path": node.get_abs_node_path(),
        "name": node.name(),
        "kind": "suite" if isinstance(node, ecflow.Suite) else "family" if isinstance(node, ecflow.Family) else "task",
        "state": str(node.get_state()),
        "labels": {lab.name(): lab.new_value() or lab.value() for lab in node.labels},
        "meters": {m.name(): {"value": m.value(), "min": m.min(), "max": m.max()} for m in node.meters},
        "events": {e.name(): e.value() for e in node.events},
    }
    if node.get_defstatus() and str(node.get_defstatus()) not in ("queued",):
        data["defstatus"] = str(node.get_defstatus())
    if node.get_trigger() is not None:
        data["trigger"] = node.get_trigger().get_expression()
    if node.get_complete() is not None:
        data["complete"] = node.get_complete().get_expression()
    if isinstance(node, ecflow.Task):
        data["try_no"] = int(node.get_try_no() or 0)
        data["aborted_reason"] = node.get_aborted_reason()
        data["rid"] = node.get_process_or_remote_id()
        left = resubmissions_left(node)
        if left:        # aborted at its time limit: the relay's next pass resubmits it
            data["resubmissions_left"] = left
    if isinstance(node, ecflow.Suite):
        data["limits"] = {lim.name(): {"value": lim.value(), "limit": lim.limit()} for lim in node.limits}
    if node.is_suspended():
        data["suspended"] = True
    if not isinstance(node, ecflow.Task):
        data["children"] = [_node(c) for c in node.nodes]
    return data


def tree(client, suite: str | None = None) -> dict[str, Any]:
    client.sync_local()
    defs = client.get_defs()
    out: dict[str, Any] = {"server_state": str(defs.get_server_state()) if defs else "unknown", "suites": []}
    if defs is None:
        return out
    for s in defs.suites:
        if suite is None or s.name() == suite.strip("/"):
            out["suites"].append(_node(s))
    if suite and not out["suites"]:
        raise SuiteError(f"no suite {suite!r} on the server (have: {', '.join(x.name() for x in defs.suites) or 'none'})")
    return out


def find(tree_data: dict[str, Any], path: str) -> dict[str, Any] | None:
    stack = list(tree_data.get("suites", []))
    while stack:
        n = stack.pop()
        if n["path"] == path:
            return n
        stack.extend(n.get("children", []))
    return None


def control(client, action: str, path: str) -> None:
    """suspend, resume, requeue or kill a node, with the server's error turned into SuiteError."""
    import ecflow

    client.sync_local()
    defs = client.get_defs()
    node = defs.find_abs_node(path) if defs is not None else None
    if node is None:
        raise SuiteError(f"no node {path!r} on the server")
    state = str(node.get_state())
    running = state in ("active", "submitted") or any(
        str(n.get_state()) in ("active", "submitted") for n in node.get_all_nodes() if isinstance(n, ecflow.Task))
    if action == "requeue" and running:
        raise SuiteError(f"{path} is {state} (or has running tasks): ecFlow ignores a requeue of running work; "
                         f"kill it first ('maelflow kill {path}')")
    if action == "kill" and not running:
        raise SuiteError(f"nothing to kill under {path}: it is {state}")
    try:
        if action == "suspend":
            client.suspend(path)
        elif action == "resume":
            client.resume(path)
        elif action == "requeue":
            client.requeue(path)
        elif action == "kill":
            client.kill(path)
        else:
            raise SuiteError(f"unknown action {action!r}")
    except RuntimeError as exc:
        raise SuiteError(f"{action} {path}: {str(exc).strip()}") from None
