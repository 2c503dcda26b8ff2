"""One recipe module per stage; each exposes `run(config) -> final metrics`."""
