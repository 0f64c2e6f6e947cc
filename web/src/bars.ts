// Bars as the API sends them, and the chart's model of them: one bar per bucket start, exact
// decimal strings kept as given (numbers only at the drawing boundary), gaps as gaps.
//
// A bar's state: `final` (the API's final: true), `forming` (the open bucket: the last bar of a
// `/v1/ohlcv` answer with `forming: true`, or a bar whose wire `state` says so), else
// `provisional` (closed by the stream, not yet confirmed by a backfill). Until the API marks the
// forming bar on every message, a stream bar whose bucket holds the current time is taken as
// forming (for a replay, whose clock is not the wall clock, its newest non-final bar).

export const INTERVAL_SECONDS: Record<string, number> = {
  "1m": 60,
  "5m": 300,
  "15m": 900,
  "30m": 1800,
  "1h": 3600,
  "4h": 14400,
  "1d": 86400,
};

export type BarState = "final" | "provisional" | "forming";

/** `/v1/ohlcv` bar (api/schemas.py BarPublic). */
export interface OhlcvBar {
  time: number;
  open: string;
  high: string;
  low: string;
  close: string;
  volume: string;
  quote_volume?: string;
  trades: number | null;
  source: string;
  final: boolean;
  state?: string;
  forming?: boolean;
}

export interface OhlcvAnswer {
  instrument: string;
  interval: string;
  start: number;
  end: number;
  bars: OhlcvBar[];
  gaps: Array<{ start: number; end: number }>;
  complete: boolean;
  forming?: boolean;
}

/** `WS /v1/stream` bar (candlekeep.messages.encode_bar): `start` instead of `time`. */
export interface StreamBar {
  instrument: string;
  interval: string;
  start: number;
  open: string;
  high: string;
  low: string;
  close: string;
  volume: string;
  trades: number | null;
  final: boolean;
  revision: number;
  source: string;
  state?: string;
  forming?: boolean;
}

export interface ChartBar {
  time: number;
  open: string;
  high: string;
  low: string;
  close: string;
  volume: string;
  trades: number | null;
  final: boolean;
  state: BarState;
  revision: number;
}

function wireState(bar: { final: boolean; state?: string; forming?: boolean }): BarState | null {
  if (bar.final) return "final";
  if (bar.state === "forming" || bar.forming === true) return "forming";
  if (bar.state === "provisional" || bar.state === "closed" || bar.forming === false) return "provisional";
  return null;
}

export function fromOhlcv(answer: OhlcvAnswer): ChartBar[] {
  const last = answer.bars.length - 1;
  return answer.bars.map((b, i) => ({
    time: b.time,
    open: b.open,
    high: b.high,
    low: b.low,
    close: b.close,
    volume: b.volume,
    trades: b.trades,
    final: b.final,
    state: wireState(b) ?? (i === last && answer.forming ? "forming" : "provisional"),
    revision: 0,
  }));
}

/** `nowS`: the clock the bar is judged by (the wall clock live; +Infinity for a replay, whose newest
 *  non-final bar is its forming one). */
export function fromStream(bar: StreamBar, step: number, nowS: number): ChartBar {
  return {
    time: bar.start,
    open: bar.open,
    high: bar.high,
    low: bar.low,
    close: bar.close,
    volume: bar.volume,
    trades: bar.trades,
    final: bar.final,
    state: wireState(bar) ?? (bar.start + step > nowS ? "forming" : "provisional"),
    revision: bar.revision,
  };
}

/** The bars of one (instrument, interval), ascending by start, one per bucket. */
export class BarSeries {
  private byTime = new Map<number, ChartBar>();
  private sorted: ChartBar[] = [];
  private dirty = false;

  constructor(readonly step: number) {}

  get size(): number {
    return this.byTime.size;
  }

  /** Adds bars, replacing those of the same start (a later revision wins; a final bar stays). */
  upsert(bars: ChartBar[]): void {
    for (const bar of bars) {
      const had = this.byTime.get(bar.time);
      if (had && had.final && !bar.final) continue; // a final bar is never replaced by a stream bar
      this.byTime.set(bar.time, bar);
      this.dirty = true;
    }
  }

  bars(): ChartBar[] {
    if (this.dirty) {
      this.sorted = [...this.byTime.values()].sort((a, b) => a.time - b.time);
      const last = this.sorted.length - 1;
      this.sorted.forEach((bar, i) => {
        if (bar.state === "forming" && i !== last) bar.state = "provisional"; // a newer bucket exists
      });
      this.dirty = false;
    }
    return this.sorted;
  }

  first(): ChartBar | undefined {
    return this.bars()[0];
  }

  last(): ChartBar | undefined {
    const all = this.bars();
    return all[all.length - 1];
  }

  /** Bucket starts with no bar between the first and the last bar (what the chart leaves empty). */
  holes(maxPerHole = 5000): number[] {
    const out: number[] = [];
    const all = this.bars();
    for (let i = 1; i < all.length; i++) {
      const missing = (all[i].time - all[i - 1].time) / this.step - 1;
      for (let k = 1; k <= Math.min(missing, maxPerHole); k++) out.push(all[i - 1].time + k * this.step);
    }
    return out;
  }
}
