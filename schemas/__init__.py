"""Declarations shared by the driver and the workers: row schema, job config, manifest."""
