"""candlekeep.query: request values parsed strictly (ASCII digits for unix seconds)."""

from __future__ import annotations

import pytest

from candlekeep.query import QueryError, parse_timestamp


def test_unix_seconds_and_iso_are_parsed() -> None:
    assert parse_timestamp("1704067200", name="start") == 1704067200
    assert parse_timestamp("2024-01-01", name="start") == 1704067200
    assert parse_timestamp("2024-01-01T01:00:00+01:00", name="start") == 1704067200


@pytest.mark.parametrize("text", ["\u0661\u0667\u0660\u0664\u0660\u0666\u0667\u0662\u0660\u0660",  # Arabic-Indic
                                  "\uff11\uff17\uff10\uff14\uff10\uff16\uff17\uff12\uff10\uff10",  # full-width
                                  "\u0967\u096d\u0966\u096a"])  # Devanagari
def test_unicode_digits_are_not_unix_seconds(text: str) -> None:
    assert int(text) > 0  # Python's int() would take them
    with pytest.raises(QueryError, match="expected unix seconds or ISO-8601"):
        parse_timestamp(text, name="start")
