"""Mirror a catalogue model into MLflow's model registry: registered model, versions, aliases.

The catalogue is the record (immutable versions, append-only alias history, rollback); MLflow's
registry shows the same to MLflow users. :func:`sync_model` makes MLflow agree with one catalogue
record and can run any number of times: a version is found by its ``maelflow.version`` tag and
created only once, and every alias is set to the MLflow version of the catalogue version it names
(an alias the catalogue no longer has is removed). So a mirror that failed (MLflow down during a
rollback) is repaired by the next one.

MLflow checks a version's ``source``: a local path is refused unless it lies in the run's artifact
folder (mlflow#8139), so the checkpoint file is logged as an artifact of the training's run
(``checkpoint/<file>``) and the version's source is ``runs:/<run id>/checkpoint``. A version with no
known run gets a run of its own in the experiment ``maelflow-models``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

VERSION_TAG = "maelflow.version"
MODELS_EXPERIMENT = "maelflow-models"


class MirrorError(Exception):
    """MLflow's registry could not be brought in line with the catalogue (the message says why)."""


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri)


def _ensure_model(client, name: str, description: str | None) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code):
            raise
        client.create_registered_model(name, tags={"maelflow.catalogue": f"models/{name}"},
                                       description=description or "mirrored from the maelflow catalogue")


def _run_for(client, name: str, number: str, version: dict) -> str:
    from mlflow.exceptions import MlflowException

    run_id = (version.get("mlflow") or {}).get("run_id") or version.get("run_id")
    if run_id:
        try:
            client.get_run(run_id)
            return run_id
        except MlflowException:
            pass  # a run of another tracking server (an offline run not synced): a run of its own
    exp = client.get_experiment_by_name(MODELS_EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(MODELS_EXPERIMENT)
    run = client.create_run(exp_id, run_name=f"{name}-v{number}",
                            tags={"maelflow.model": name, VERSION_TAG: number})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def sync_model(tracking_uri: str, model: dict, checkpoint_file: Callable[[str, dict], Path | None] | None = None
               ) -> dict[str, Any]:
    """Make MLflow's registry show catalogue ``model``'s versions and aliases; returns what it did.

    ``checkpoint_file(number, version)`` gives a local copy of a version's checkpoint, logged as the
    run's artifact the first time the version is mirrored (None: no artifact, the version's source
    is then the run's ``checkpoint`` folder all the same).
    """
    from mlflow.exceptions import MlflowException

    name = model["name"]
    client = _client(tracking_uri)
    created: list[str] = []
    try:
        _ensure_model(client, name, model.get("description"))
        mirrored = {mv.tags.get(VERSION_TAG): mv for mv in client.search_model_versions(f"name='{name}'")
                    if mv.tags.get(VERSION_TAG)}
        versions = model.get("versions") or {}
        for number in sorted(versions, key=int):
            if number in mirrored:
                continue
            version = versions[number]
            run_id = _run_for(client, name, number, version)
            local = checkpoint_file(number, version) if checkpoint_file else None
            if local is not None:
                client.log_artifact(run_id, str(local), "checkpoint")
            tags = {VERSION_TAG: number, "maelflow.weights": version.get("weights", ""),
                    "maelflow.sha256": version.get("sha256", ""), "maelflow.training": version.get("training", ""),
                    "maelflow.gate": (version.get("gate") or {}).get("decision", "manual" if version.get("reason") else "")}
            mv = client.create_model_version(name, f"runs:/{run_id}/checkpoint", run_id=run_id,
                                             tags={k: str(v) for k, v in tags.items() if v},
                                             description=version.get("reason") or version.get("description"),
                                             await_creation_for=0)  # a runs:/ source is ready at once
            mirrored[number] = mv
            created.append(number)
        wanted = {alias: mirrored[str(n)].version for alias, n in (model.get("aliases") or {}).items()
                  if str(n) in mirrored}
        current = dict(getattr(client.get_registered_model(name), "aliases", {}) or {})
        for alias, mlflow_version in wanted.items():
            if str(current.get(alias)) != str(mlflow_version):
                client.set_registered_model_alias(name, alias, mlflow_version)
        for alias in set(current) - set(wanted):
            client.delete_registered_model_alias(name, alias)
    except MlflowException as exc:
        raise MirrorError(f"MLflow's model registry at {tracking_uri} refused model {name!r}: {exc.message}") from None
    except OSError as exc:
        raise MirrorError(f"MLflow at {tracking_uri} cannot be reached: {exc}") from None
    return {"model": name, "created": created, "aliases": wanted,
            "versions": {n: mv.version for n, mv in mirrored.items()}}


def registry_view(tracking_uri: str, name: str) -> dict[str, Any]:
    """What MLflow's registry shows of ``name``: versions (catalogue number -> MLflow version, source,
    run) and aliases (alias -> catalogue version number)."""
    client = _client(tracking_uri)
    versions = {mv.tags.get(VERSION_TAG): {"mlflow_version": mv.version, "source": mv.source, "run_id": mv.run_id}
                for mv in client.search_model_versions(f"name='{name}'")}
    by_mlflow = {v["mlflow_version"]: n for n, v in versions.items()}
    aliases = dict(getattr(client.get_registered_model(name), "aliases", {}) or {})
    return {"versions": versions, "aliases": {a: by_mlflow.get(str(v)) for a, v in aliases.items()}}
