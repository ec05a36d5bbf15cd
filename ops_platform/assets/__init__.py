"""Dagster wrappers: one module per domain, each builds its assets from the spec."""
