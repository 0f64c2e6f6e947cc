// `window.__candlekeep`: what the page fetched and drew, for the browser tests (tests/web/) and the
// bench (bench/web.py). Plain data only; the panels write it, nothing reads it back.

import type { ChartBar } from "./bars";

export interface LiveUpdate {
  time: number;
  close: string;
  trades: number | null;
  state: string;
  at: number;
  wallMs: number;
  /** after the stream's snapshot (its bars were formed before the socket opened) */
  live: boolean;
}

export interface DataLayer {
  chart: {
    instrument: string | null;
    interval: string | null;
    range: { start: number; end: number };
    bars: ChartBar[];
    holes: number[];
    loaded: boolean;
    pages: number;
    updates: number;
    lastUpdate: LiveUpdate | null;
    /** the last 100 live updates, oldest first */
    updateLog: LiveUpdate[];
    firstCandleMs: number | null;
    /** performance.now() in the first frame after the first load's whole range was drawn */
    rangeDrawnMs?: number;
    /** performance.now() of the first load's steps: bars fetched, handed to the chart, first frame */
    timings?: { fetchedMs: number; handedToChartMs: number; firstFrameMs: number; firstBars: number };
    feed: string;
    feedDetail: string;
    reconnects: number;
    error: string | null;
  };
  instruments: string[];
  health: unknown;
  status: unknown;
  replay: { session: Record<string, unknown> | null; clock: number | null; actions: string[]; error: string | null };
  book: { instrument: string | null; book: unknown; consolidated: unknown; error: string | null };
  heatmap: {
    cells: number;
    slices: number;
    renderMs: number | null;
    range: { start: number; end: number } | null;
    /** [ts, painted rows] of each stored slice drawn (the live columns are not in it) */
    storedColumns: Array<[number, number]>;
    error: string | null;
  };
  keyPrompts: number;
  /** performance.now() when main.ts started running */
  scriptStartMs?: number;
  /** performance.now() when main.ts had built the page */
  builtMs?: number;
  renderHeatmap?: (slices: number, buckets: number) => number;
  bareRaster?: () => number;
}

declare global {
  interface Window {
    __candlekeep: DataLayer;
  }
}

export function dataLayer(): DataLayer {
  if (!window.__candlekeep) {
    window.__candlekeep = {
      chart: {
        instrument: null, interval: null, range: { start: 0, end: 0 }, bars: [], holes: [], loaded: false, pages: 0,
        updates: 0, lastUpdate: null, updateLog: [], firstCandleMs: null, feed: "closed", feedDetail: "", reconnects: 0, error: null,
      },
      instruments: [],
      health: null,
      status: null,
      replay: { session: null, clock: null, actions: [], error: null },
      book: { instrument: null, book: null, consolidated: null, error: null },
      heatmap: { cells: 0, slices: 0, renderMs: null, range: null, storedColumns: [], error: null },
      keyPrompts: 0,
    }; // prettier-ignore
  }
  return window.__candlekeep;
}
