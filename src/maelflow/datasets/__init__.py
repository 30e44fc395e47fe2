"""ML-ready datasets built on this machine from anemoi-datasets recipes."""

from maelflow.datasets.build import DatasetBuildError, build_dataset, make_synthetic_netcdf, materialize_recipe

__all__ = ["DatasetBuildError", "build_dataset", "make_synthetic_netcdf", "materialize_recipe"]
