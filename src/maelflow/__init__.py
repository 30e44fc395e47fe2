"""maelflow: one config to ecFlow suites that move weather ML datasets and train on EuroHPC sites."""

__version__ = "0.1.0"
