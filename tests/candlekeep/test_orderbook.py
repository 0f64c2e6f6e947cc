"""OrderBook against a plain-dict reference (sorted only when read), on random update streams."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from candlekeep.orderbook import OrderBook

prices = st.integers(1, 60).map(lambda n: Decimal(n) / 4)
sizes = st.one_of(st.just(Decimal(0)), st.integers(1, 10**6).map(lambda n: Decimal(n).scaleb(-4)))
updates = st.lists(st.tuples(st.booleans(), prices, sizes), max_size=300)


@settings(max_examples=200, deadline=None)
@given(updates, st.integers(1, 20))
def test_book_matches_a_plain_dict_reference(stream: list[tuple[bool, Decimal, Decimal]], n: int) -> None:
    book = OrderBook("test:A-B")
    ref: dict[bool, dict[Decimal, Decimal]] = {True: {}, False: {}}
    for is_bid, price, size in stream:
        (book.set_bid if is_bid else book.set_ask)(price, size)
        if size == 0:
            ref[is_bid].pop(price, None)
        else:
            ref[is_bid][price] = size
    want_bids = sorted(ref[True].items(), reverse=True)
    want_asks = sorted(ref[False].items())
    assert list(book.bids()) == want_bids
    assert list(book.asks()) == want_asks
    assert list(book.bids(n)) == want_bids[:n]
    assert list(book.asks(n)) == want_asks[:n]
    assert book.best_bid() == (want_bids[0] if want_bids else None)
    assert book.best_ask() == (want_asks[0] if want_asks else None)
    assert book.crossed() == bool(want_bids and want_asks and want_bids[0][0] >= want_asks[0][0])
    edge = Decimal(n) / 3  # on a price sometimes (multiples of 1/4 and 1/3 meet), between them otherwise
    for bound in (edge, Decimal(n) / 4):
        assert book.bids_at_or_above(bound) == sum(1 for p, _ in want_bids if p >= bound)
        assert book.asks_at_or_below(bound) == sum(1 for p, _ in want_asks if p <= bound)
    book.truncate(n)
    assert list(book.bids()) == want_bids[:n] and list(book.asks()) == want_asks[:n]


def test_replace_drops_the_old_book_and_keeps_wire_digits() -> None:
    book = OrderBook("test:A-B")
    book.update([(Decimal("1.0"), Decimal("2"))], [(Decimal("3"), Decimal("4"))])
    book.replace([(Decimal("0.000022900"), Decimal("13355.87450757"))], [])
    assert book.bids() == ((Decimal("0.000022900"), Decimal("13355.87450757")),)
    assert str(book.bids()[0][0]) == "0.000022900"
    assert book.asks() == ()

