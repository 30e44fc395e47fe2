"""The dataset mover: manifest, publish to the EWC object store, stage to a site, verify.

Every object is checked against a manifest of sizes and SHA-256 sums written at publish time, a
re-run continues where the last one stopped, and a staged dataset becomes visible only when complete.

A library: it takes a store, a destination and settings as arguments and never imports maelflow
(whose ``maelflow.datasets`` is the glue that builds them from a configuration).

Modules: ``manifest`` (what a complete copy is), ``paths`` (keys and writes that stay inside their
folder), ``store`` (the dataset in S3, through obstore), ``publish`` and ``stage`` (the engines),
``trees`` (where a stage writes: a local folder, or a folder on a site reached by a command runner
and rsync), ``push`` (a site's copy from a local one or through a bounded spool), ``local_source``
(a local copy read like the store), ``progress``, ``retry``, ``errors``. Reference: docs/transfer.md.
"""
