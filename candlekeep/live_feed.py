"""The seam between a snapshot and live bar updates (the kdb+ handoff), for live subscribers.

    seam = Seam()
    for bar in snapshot: if seam.offer(bar): send(bar)       # after subscribing to the updates
    for bar in updates:  if seam.offer(bar): send(bar)       # live: only what is news

A subscriber subscribes to the updates channel FIRST, then reads the snapshot. Updates published
between the two are then received although the snapshot already holds them (or something newer):
`offer` drops those, so there is no duplicate at the seam; nothing published after the subscription
is missed, so there is no gap.

Whether an update is news, for the bar of the same start already sent (`newer`):
- identical: no;
- a higher revision: yes; a lower one: no (revisions count published versions of a closed bar);
- same revision: a final bar replaces a provisional one, never the other way round; between two
  provisional bars of one revision (the forming bar, which is published as it grows, always at
  revision 0) the one with more trades, then more volume, is the newer: a forming bar only grows,
  so an update with fewer trades or less volume is one the snapshot already superseded.
A start never sent is news. The memory is bounded (`keep` starts, the oldest forgotten first); a
forgotten bar's next update is sent again, which a client upserting by start absorbs.
"""

from __future__ import annotations

from collections import OrderedDict

from candlekeep.bars import Bar

DEFAULT_KEEP = 4096


def newer(update: Bar, sent: Bar) -> bool:
    """Is `update` news to a client that holds `sent` (same instrument, interval and start)?"""
    if update == sent:
        return False
    if update.revision != sent.revision:
        return update.revision > sent.revision
    if update.final != sent.final:
        return update.final
    if update.trades is not None and sent.trades is not None and update.trades != sent.trades:
        return update.trades > sent.trades
    if update.volume != sent.volume:
        return update.volume > sent.volume
    return True  # same revision, finality and size, other values: a correction, send it


class Seam:
    """The bars sent to one subscriber, by start; `offer` says whether a bar is news (and records it)."""

    def __init__(self, *, keep: int = DEFAULT_KEEP) -> None:
        if keep < 1:
            raise ValueError("keep must be positive")
        self.keep = keep
        self._sent: OrderedDict[int, Bar] = OrderedDict()
        self.dropped = 0  # updates already covered

    def offer(self, bar: Bar) -> bool:
        sent = self._sent.get(bar.start)
        if sent is not None and not newer(bar, sent):
            self.dropped += 1
            return False
        self._sent[bar.start] = bar
        self._sent.move_to_end(bar.start)
        while len(self._sent) > self.keep:
            self._sent.popitem(last=False)
        return True

    @property
    def newest_start(self) -> int | None:
        return max(self._sent) if self._sent else None
