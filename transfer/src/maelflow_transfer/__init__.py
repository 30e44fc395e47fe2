"""The dataset mover: manifest, publish to the EWC object store, stage to a site, verify.

Every object is checked against a manifest of sizes and SHA-256 sums written at publish time, a
re-run continues where the last one stopped, and a staged dataset becomes visible only when complete.

Modules: ``manifest`` (what a complete copy is), ``store`` (the dataset in S3, through obstore),
``publish`` and ``stage`` (the engines), ``trees`` (where a stage writes: a local folder or a site
over SFTP), ``runner`` (where a stage runs), ``progress``, ``retry``, ``errors``, ``config`` (sites,
prefixes and EWC settings from maelflow's configuration), ``catalogue_hook`` and ``worker`` (the
catalogue's locations and transfer tasks). Reference: docs/transfer.md.
"""
