"""Candlekeep's Dagster code: bar assets partitioned by UTC date x instrument, their checks,
refresh schedules and the instruments sensor. `definitions.py` is the table of contents;
`assets.materialize_range` runs the same assets in-process for `candlekeep backfill`.
"""
