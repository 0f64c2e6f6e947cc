// The chart panel: candles and volume of one (instrument, interval) with lightweight-charts.
//
// History from `GET /v1/ohlcv` (one day's worth of buckets, older pages as the user scrolls back;
// `wait=0`: draw what is stored now, a missing range shows as a gap rather than a blank chart),
// then the forming bar and every close or revision from `WS /v1/stream` (stream.ts). A bucket with
// no bar is drawn as whitespace (an empty slot, never a line bridging it); final bars are solid,
// provisional ones hollow, the forming bar amber. What was drawn is published on
// `window.__candlekeep.chart` for the browser tests and the bench.

import {
  CandlestickSeries,
  ColorType,
  CrosshairMode,
  HistogramSeries,
  createChart,
  type CandlestickData,
  type HistogramData,
  type IChartApi,
  type ISeriesApi,
  type LogicalRange,
  type Time,
  type UTCTimestamp,
  type WhitespaceData,
} from "lightweight-charts";
import { getJson } from "./api";
import { BarSeries, fromOhlcv, fromStream, INTERVAL_SECONDS, type ChartBar, type OhlcvAnswer } from "./bars";
import { dataLayer } from "./datalayer";
import { LiveFeed, type FeedState } from "./stream";
import { el, fmtAge, fmtPrice, fmtVolume } from "./ui";

const PAGE_BUCKETS = 1440; // one day of 1m bars per request
export const FIRST_BUCKETS = 300; // the first request: the newest buckets, more than the 200 shown at first
const SCROLL_BACK_MARGIN = 40; // bars left of the visible range before an older page is loaded
const EMPTY_PAGES_BEFORE_STOP = 3;

const UP = "#26a69a";
const DOWN = "#ef5350";
const FORMING = "#f0b90b";

type Candle = CandlestickData<Time> | WhitespaceData<Time>;
type Volume = HistogramData<Time> | WhitespaceData<Time>;

export interface ChartTarget {
  instrument: string;
  interval: string;
  /** [start, end) to show first; default: the last PAGE_BUCKETS buckets up to now. */
  range?: { start: number; end: number };
}

/** The first page of a live chart: the last PAGE_BUCKETS buckets, the forming one included. */
export function initialRange(interval: string, nowS = Date.now() / 1000): { start: number; end: number } {
  const step = INTERVAL_SECONDS[interval];
  const bucket = Math.floor(nowS / step);
  return { start: (bucket - PAGE_BUCKETS + 1) * step, end: (bucket + 1) * step };
}

/** The newest FIRST_BUCKETS of `range`, asked for first: the first candle waits on a fifth of a day's
 *  bytes (the server's read and encode, the transfer, the parse and setData all scale with it),
 *  and the rest of the range follows as a second request once those are drawn. */
export function firstPart(range: { start: number; end: number }, step: number): { start: number; end: number } {
  return { start: Math.max(range.start, range.end - FIRST_BUCKETS * step), end: range.end };
}

/** `GET /v1/ohlcv` for the chart: `wait=0`, what is stored now. */
export function fetchBars(instrument: string, interval: string, range: { start: number; end: number }): Promise<OhlcvAnswer> {
  return getJson<OhlcvAnswer>("/v1/ohlcv", { instrument, interval, start: range.start, end: range.end, wait: 0 });
}

export class ChartPanel {
  readonly root: HTMLElement;
  private chart: IChartApi;
  private candles: ISeriesApi<"Candlestick">;
  private volume: ISeriesApi<"Histogram">;
  private legend: HTMLElement;
  private status: HTMLElement;
  private series: BarSeries | null = null;
  private feed: LiveFeed | null = null;
  private target: ChartTarget | null = null;
  private generation = 0;
  private loadingOlder = false;
  private emptyPages = 0;
  private oldestRequested = 0;
  private drawnLength = 0;
  private feedState: FeedState = "closed";
  private firstDrawListeners: Array<() => void> = [];

  constructor(host: HTMLElement) {
    this.root = host;
    const plot = el("div", { class: "chart-plot" });
    this.legend = el("div", { class: "chart-legend" });
    this.status = el("div", { class: "chart-status" });
    host.append(plot, this.legend, this.status);
    this.chart = createChart(plot, {
      autoSize: true,
      layout: {
        background: { type: ColorType.Solid, color: "#0b0e14" },
        textColor: "#8b94a7",
        fontFamily: "var(--mono)",
        fontSize: 11,
        attributionLogo: true,
      },
      grid: { vertLines: { color: "#161b26" }, horzLines: { color: "#161b26" } },
      crosshair: { mode: CrosshairMode.Normal },
      rightPriceScale: { borderColor: "#222a38" },
      timeScale: { borderColor: "#222a38", timeVisible: true, secondsVisible: false, rightOffset: 6 },
      localization: { timeFormatter: (t: number) => new Date(t * 1000).toISOString().slice(0, 16).replace("T", " ") },
    });
    this.candles = this.chart.addSeries(CandlestickSeries, {
      upColor: UP,
      downColor: DOWN,
      borderUpColor: UP,
      borderDownColor: DOWN,
      wickUpColor: UP,
      wickDownColor: DOWN,
      priceLineColor: "#3a4356",
    });
    this.volume = this.chart.addSeries(HistogramSeries, {
      priceScaleId: "volume",
      priceFormat: { type: "volume" },
      lastValueVisible: false,
      priceLineVisible: false,
    });
    this.chart.priceScale("volume").applyOptions({ scaleMargins: { top: 0.82, bottom: 0 } });
    this.candles.priceScale().applyOptions({ scaleMargins: { top: 0.08, bottom: 0.22 } });
    this.chart.timeScale().subscribeVisibleLogicalRangeChange((range) => this.onScroll(range));
    this.chart.subscribeCrosshairMove((param) => {
      const t = typeof param.time === "number" ? param.time : undefined;
      this.showLegend(t);
    });
    window.setInterval(() => this.showStatus(), 1000);
  }

  /** `listener` once, in the frame the first candle is drawn. */
  onFirstDraw(listener: () => void): void {
    this.firstDrawListeners.push(listener);
  }

  get current(): ChartTarget | null {
    return this.target;
  }

  /** Shows `target`: its range's newest FIRST_BUCKETS first, then the rest; `prefetched`: that
   *  first part, already asked for (index.html starts the fetch before the page's script loads). */
  async show(target: ChartTarget, prefetched?: { range: { start: number; end: number }; answer: Promise<OhlcvAnswer> }): Promise<void> {
    const generation = ++this.generation;
    this.feed?.stop();
    this.feed = null;
    this.target = target;
    const step = INTERVAL_SECONDS[target.interval];
    const series = new BarSeries(step);
    this.series = series;
    this.emptyPages = 0;
    this.drawnLength = 0;
    const range = target.range ?? prefetched?.range ?? initialRange(target.interval);
    const first = firstPart(range, step);
    this.oldestRequested = range.start;
    const layer = dataLayer().chart;
    Object.assign(layer, { instrument: target.instrument, interval: target.interval, range, bars: [], holes: [],
                           loaded: false, updates: 0, updateLog: [], lastUpdate: null, error: null, pages: 0 }); // prettier-ignore
    this.candles.setData([]);
    this.volume.setData([]);
    this.showLegend(undefined);
    let answer: OhlcvAnswer;
    try {
      answer = await (prefetched?.answer ?? fetchBars(target.instrument, target.interval, first));
    } catch (exc) {
      if (generation !== this.generation) return;
      layer.error = String(exc);
      this.status.textContent = `history: ${exc}`;
      return;
    }
    if (generation !== this.generation) return;
    const fetched = performance.now();
    series.upsert(fromOhlcv(answer));
    this.redraw(false);
    this.chart.timeScale().fitContent();
    if (series.size > 200) {
      const n = this.drawnLength;
      this.chart.timeScale().setVisibleLogicalRange({ from: n - 200, to: n + 6 });
    }
    const handed = performance.now();
    const firstLoad = layer.firstCandleMs === null;
    requestAnimationFrame(() => {
      if (layer.firstCandleMs === null && series.size > 0) {
        layer.firstCandleMs = performance.now();
        layer.timings = { fetchedMs: fetched, handedToChartMs: handed, firstFrameMs: layer.firstCandleMs, firstBars: series.size };
        for (const listener of this.firstDrawListeners.splice(0)) listener();
      }
    });
    this.startFeed(target, generation, series, range);
    if (first.start > range.start) {
      try {
        const rest = await fetchBars(target.instrument, target.interval, { start: range.start, end: first.start });
        if (generation !== this.generation) return;
        series.upsert(fromOhlcv({ ...rest, forming: false }));
        this.redraw(true);
      } catch (exc) {
        if (generation !== this.generation) return;
        this.status.textContent = `older bars: ${exc}`; // the first part stays; scroll-back asks again
        this.oldestRequested = first.start;
      }
    }
    layer.pages = 1;
    layer.loaded = true;
    if (firstLoad) requestAnimationFrame(() => (layer.rangeDrawnMs = performance.now()));
  }

  private startFeed(target: ChartTarget, generation: number, series: BarSeries, range: { start: number; end: number }): void {
    const layer = dataLayer().chart;
    const step = series.step;
    const wireInstrument = streamInstrument(target.instrument);
    this.feed = new LiveFeed(target.instrument, target.interval, step, () => series.last()?.time ?? range.start, {
      bar: (wire) => {
        if (generation !== this.generation || wire.instrument !== wireInstrument || wire.interval !== target.interval) return;
        const nowS = target.instrument.startsWith("replay:") ? Infinity : Date.now() / 1000;
        this.onLiveBar(fromStream(wire, step, nowS));
      },
      state: (state, detail) => {
        this.feedState = state;
        layer.feed = state;
        layer.feedDetail = detail;
        layer.reconnects = this.feed?.reconnects ?? 0;
        this.showStatus();
      },
    });
    this.feed.start();
  }

  stop(): void {
    this.generation++;
    this.feed?.stop();
    this.feed = null;
  }

  private onLiveBar(bar: ChartBar): void {
    const series = this.series;
    if (!series) return;
    const last = series.last();
    series.upsert([bar]);
    const layer = dataLayer().chart;
    layer.updates++;
    layer.lastUpdate = { time: bar.time, close: bar.close, trades: bar.trades, state: bar.state, at: performance.now(), wallMs: Date.now(),
                         live: this.feedState === "live" }; // prettier-ignore
    layer.updateLog.push(layer.lastUpdate);
    if (layer.updateLog.length > 100) layer.updateLog.shift();
    const contiguous = last !== undefined && (bar.time === last.time || bar.time === last.time + series.step);
    if (contiguous) {
      if (last && bar.time > last.time && last.state === "forming") last.state = "provisional";
      if (last && bar.time > last.time) this.candles.update(candle(last)); // restyle the bar it closed
      this.candles.update(candle(series.last()!));
      this.volume.update(volumeBar(series.last()!));
      this.drawnLength += bar.time > (last?.time ?? 0) ? 1 : 0;
      layer.bars = series.bars().map((b) => ({ ...b }));
    } else {
      this.redraw(true);
    }
    this.showLegend(undefined);
    this.showStatus();
  }

  /** Draws every bar, with whitespace in each hole; `keep` holds the view on the same bars. */
  private redraw(keep: boolean): void {
    const series = this.series!;
    const bars = series.bars();
    const holes = series.holes();
    const candles: Candle[] = [];
    const volumes: Volume[] = [];
    let h = 0;
    for (const bar of bars) {
      while (h < holes.length && holes[h] < bar.time) {
        candles.push({ time: holes[h] as UTCTimestamp });
        volumes.push({ time: holes[h] as UTCTimestamp });
        h++;
      }
      candles.push(candle(bar));
      volumes.push(volumeBar(bar));
    }
    const before = this.drawnLength;
    const view = keep ? this.chart.timeScale().getVisibleLogicalRange() : null;
    this.candles.setData(candles);
    this.volume.setData(volumes);
    this.drawnLength = candles.length;
    if (view && before > 0) {
      // prepending n points moves every old point n slots right: keep what the user was looking at
      const added = bars.length && bars[0].time < (dataLayer().chart.bars[0]?.time ?? Infinity) ? candles.length - before : 0;
      this.chart.timeScale().setVisibleLogicalRange({ from: view.from + added, to: view.to + added });
    }
    const layer = dataLayer().chart;
    layer.bars = bars.map((b) => ({ ...b }));
    layer.holes = holes;
  }

  private async onScroll(range: LogicalRange | null): Promise<void> {
    const target = this.target;
    const series = this.series;
    if (!range || !target || !series || this.loadingOlder || range.from > SCROLL_BACK_MARGIN) return;
    if (this.emptyPages >= EMPTY_PAGES_BEFORE_STOP || !dataLayer().chart.loaded) return;
    if (target.range && this.oldestRequested <= target.range.start) return; // a replay: its range is all there is
    const generation = this.generation;
    this.loadingOlder = true;
    const end = this.oldestRequested;
    const start = end - PAGE_BUCKETS * series.step;
    try {
      const answer = await fetchBars(target.instrument, target.interval, { start, end });
      if (generation !== this.generation) return;
      this.oldestRequested = start;
      const layer = dataLayer().chart;
      layer.pages++;
      layer.range = { start, end: layer.range.end };
      if (answer.bars.length === 0) {
        this.emptyPages++;
        return;
      }
      this.emptyPages = 0;
      series.upsert(fromOhlcv({ ...answer, forming: false }));
      this.redraw(true);
    } catch (exc) {
      this.status.textContent = `older bars: ${exc}`;
    } finally {
      this.loadingOlder = false;
    }
  }

  private showLegend(time: number | undefined): void {
    const series = this.series;
    const target = this.target;
    const bar = series ? (time !== undefined ? series.bars().find((b) => b.time === time) : series.last()) : undefined;
    this.legend.replaceChildren();
    if (!target) return;
    this.legend.append(el("span", { class: "legend-symbol" }, `${target.instrument} · ${target.interval}`));
    if (!bar) return;
    const up = Number(bar.close) >= Number(bar.open);
    const cls = up ? "up" : "down";
    for (const [k, v] of [["O", bar.open], ["H", bar.high], ["L", bar.low], ["C", bar.close]] as const) {
      this.legend.append(el("span", { class: "legend-k" }, k), el("span", { class: `legend-v ${cls}` }, fmtPrice(v)));
    }
    this.legend.append(el("span", { class: "legend-k" }, "V"), el("span", { class: "legend-v" }, fmtVolume(bar.volume)));
    this.legend.append(el("span", { class: `badge badge-${bar.state}` }, bar.state));
  }

  private showStatus(): void {
    const last = this.series?.last();
    const layer = dataLayer().chart;
    const age = last ? fmtAge(Date.now() / 1000 - last.time) : "–";
    const holes = layer.holes.length ? ` · ${layer.holes.length} empty buckets` : "";
    this.status.replaceChildren(
      el("span", { class: `dot dot-${this.feedState}` }),
      el("span", {}, `${this.feedState}${layer.feedDetail ? ` (${layer.feedDetail})` : ""}`),
      el("span", { class: "muted" }, ` · ${this.series?.size ?? 0} bars · last ${age}${holes}`),
    );
  }
}

/** The instrument a stream bar of `symbol` names: a replay's bars (`replay:<id>:<instrument>`)
 *  arrive as the replayed instrument's own bars, `candlekeep.messages.encode_bar` unchanged. */
export function streamInstrument(symbol: string): string {
  const replay = /^replay:[^:]+:(.+)$/.exec(symbol);
  return replay ? replay[1] : symbol;
}

function candle(bar: ChartBar): CandlestickData<Time> {
  const up = Number(bar.close) >= Number(bar.open);
  const color = up ? UP : DOWN;
  const base = { time: bar.time as UTCTimestamp, open: Number(bar.open), high: Number(bar.high), low: Number(bar.low), close: Number(bar.close) };
  if (bar.state === "final") return base;
  if (bar.state === "forming") return { ...base, color: "rgba(240,185,11,0.25)", borderColor: FORMING, wickColor: FORMING };
  return { ...base, color: up ? "rgba(38,166,154,0.12)" : "rgba(239,83,80,0.12)", borderColor: color, wickColor: color };
}

function volumeBar(bar: ChartBar): HistogramData<Time> {
  const up = Number(bar.close) >= Number(bar.open);
  const alpha = bar.state === "final" ? 0.45 : 0.2;
  const color = bar.state === "forming" ? `rgba(240,185,11,${alpha})` : up ? `rgba(38,166,154,${alpha})` : `rgba(239,83,80,${alpha})`;
  return { time: bar.time as UTCTimestamp, value: Number(bar.volume), color };
}
