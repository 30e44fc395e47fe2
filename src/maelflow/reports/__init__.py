"""Reports that read what trainings left in MLflow (the benchmark comparison)."""
