"""The dataset mover: manifest, publish to the EWC object store, stage to a site, verify.

Every object is checked against a manifest of sizes and SHA-256 sums written at publish time, a
re-run continues where the last one stopped, and a staged dataset becomes visible only when complete.
"""
