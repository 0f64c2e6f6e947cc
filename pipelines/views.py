"""Lineage of what the API serves: the 1h and 1d bars are rolled up from `bars_1m` where minutes exist.

`GET /v1/ohlcv?interval=1h` (and 1d) is derived in SQL from the stored 1m bars (candlekeep.storage.bars,
"derived"), and falls back to the stored deep-history bars of `bars_1h` / `bars_1d` only for buckets
with no minute at all (older than the source's minute retention). Dagster shows that as two
view assets, `ohlcv_1h` and `ohlcv_1d`, downstream of `bars_1m` and of the deep-history asset. They
are never materialized (nothing is stored for them: the read derives them), so the UI's lineage says
where the bars come from without a run that copies data.
"""

from __future__ import annotations

import dagster as dg

from pipelines.assets import bars_1d, bars_1h, bars_1m

ohlcv_1h = dg.AssetSpec(
    "ohlcv_1h",
    deps=[bars_1m, bars_1h],
    group_name="served",
    kinds={"postgres"},
    description="1h bars as GET /v1/ohlcv serves them: rolled up in SQL from bars_1m where minutes are stored, "
                "the stored bars_1h deep history before that. A view: derived at read time, never materialized.",
)  # fmt: skip
ohlcv_1d = dg.AssetSpec(
    "ohlcv_1d",
    deps=[bars_1m, bars_1d],
    group_name="served",
    kinds={"postgres"},
    description="1d bars as GET /v1/ohlcv serves them: rolled up in SQL from bars_1m where minutes are stored, "
                "the stored bars_1d deep history before that. A view: derived at read time, never materialized.",
)  # fmt: skip
