"""Operational model production: evaluate a training's checkpoint, gate it into a model version,
move and roll back aliases (mirrored to MLflow's model registry), and make forecasts with the
version an alias names, published and registered with their lineage. See docs/operations.md.

``scores`` computes the evaluation (``app_scores`` a Lightning application's, by its own
validation), ``gate`` decides, ``versions`` changes models in the catalogue
(and ``mlflow_registry`` mirrors them), ``forecast`` runs anemoi-inference and publishes, and
``tasks`` holds the bodies of the tasks that the suite's families for them run
(``maelflow.suite.operations_layout``); ``finetune`` runs the
cycles that warm-start a training from the champion on new data.
"""
