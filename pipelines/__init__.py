"""Candlekeep's Dagster code: bar assets partitioned by UTC date x instrument, their checks,
refresh schedules and the instruments sensor. `definitions.py` is the table of contents;
`assets.materialize_range` runs the same assets in-process for `candlekeep backfill`.
"""

# Dagster warns that `backfill_policy` is in beta each time this code is loaded (by the code server,
# the daemon, every run worker); the feature is used on purpose, so those warnings are noise.
from candlekeep.logs import quiet_libraries as _quiet_libraries  # noqa: E402

_quiet_libraries()
