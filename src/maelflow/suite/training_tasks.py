"""The tasks of one training in a suite, wherever it runs: the train family of an experiment, a
benchmark repeat, a fine-tuning cycle (maelflow.suite.operations_layout)."""

from __future__ import annotations

from maelflow.suite.spec import TaskSpec


def expected_epochs(training) -> int:
    """The epoch meter's range. anemoi trainings usually stop at ``training.max_steps``: maelflow's
    base config makes an epoch 10 batches (dataloader.limit_batches.training)."""
    cfg = training.config
    if training.application == "anemoi":
        t = cfg.get("training", {}) or {}
        if t.get("max_epochs"):
            return int(t["max_epochs"])
        per_epoch = ((cfg.get("dataloader", {}) or {}).get("limit_batches", {}) or {}).get("training") or 10
        return max(1, -(-int(t.get("max_steps", 10)) // int(per_epoch)))
    return int(cfg.get("max_epochs", 1) or 1)


def train_tasks(training) -> list[TaskSpec]:
    """A training's job on the site, then the copy of its offline MLflow run beside the server."""
    return [TaskSpec("train", "train",
                     meters=[("epoch", 0, expected_epochs(training)),
                             ("resubmits", 0, max(training.max_resubmissions, 1))],
                     labels=[("info", ""), ("mlflow", ""), ("checkpoint", "")],
                     events=["checkpoint", "timeout"],
                     variables={"MAELFLOW_RESUBMIT_MAX": str(training.max_resubmissions),
                                "NODES": str(training.nodes),
                                "TASKS_PER_NODE": str(max(1, training.gpus_per_node)),
                                "GPUS_PER_NODE": str(training.gpus_per_node),
                                "TIME_LIMIT": training.time_limit}),
            TaskSpec("sync", "sync", labels=[("info", ""), ("mlflow", "")], trigger="train == complete",
                     runs_on="server")]
