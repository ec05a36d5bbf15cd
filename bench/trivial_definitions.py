"""Baseline for bench/load_time.py: the smallest Dagster code location."""

import dagster as dg


@dg.asset
def one_asset() -> None:
    return None


defs = dg.Definitions(assets=[one_asset])
