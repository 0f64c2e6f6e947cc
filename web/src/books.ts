// The order-book panel (issue 11's routes): the heatmap of `GET /v1/heatmap` with live columns from
// `WS /v1/book/stream`, the current top-N of `GET /v1/book` with spread and imbalance, and the
// consolidated book of `GET /v1/book/consolidated` with each venue's age.
//
// The shapes read (candlekeep/book_serving.py; levels are `[price, size]` decimal-string pairs):
//   /v1/book          {instrument, ts_ns, sequence, age_ms, verified, source, mid, spread, bids, asks, depth_bps}
//   /v1/book/consolidated {pair, ts_ns, bucket, best_bid: {price, venues} | null, best_ask: ..., bids, asks,
//                      venues: [{instrument, age_ms, best_bid, best_ask}], excluded: [{instrument, reason}]}
//   /v1/heatmap       {instrument, start, end, resolution, bucket, columns: ["t_ms", "side", "prices", "sizes",
//                      "intensities"], slices: [[t_ms, side, prices, sizes, intensities], ...]} (one per slot and
//                      side, the arrays aligned in price order; bucket null: none stored)
//   WS /v1/book/stream {type: "snapshot", ...the /v1/book body} each time the stored book changes
// Spread is the API's (exact), else the decimal difference (scaled integers); imbalance is a displayed ratio.
// Until the books daemon has stored buckets of the last hour, the heatmap is asked for again on
// every refresh.

import { ApiError, getJson, socketUrl } from "./api";
import { dataLayer } from "./datalayer";
import { HeatmapModel, renderHeatmap } from "./heatmap";
import { el, fmtAge, fmtPrice } from "./ui";

const DEPTH = 12;
const HEATMAP_WINDOW_S = 3600;
const HEATMAP_ROWS_MAX = 200;
const REFRESH_MS = 2000;

export interface Level {
  price: string;
  size: string;
}

interface BookAnswer {
  instrument?: string;
  ts_ns?: number;
  sequence?: number | null;
  age_ms?: number | null;
  verified?: boolean;
  bids: unknown[];
  asks: unknown[];
  spread?: string | null;
  mid?: string | null;
}

interface BestPrice {
  price: string;
  venues: string[];
}

interface ConsolidatedAnswer {
  pair: string;
  bucket: string;
  best_bid: BestPrice | null;
  best_ask: BestPrice | null;
  bids: unknown[];
  asks: unknown[];
  venues: Array<{ instrument: string; age_ms: number; best_bid: string | null; best_ask: string | null }>;
  excluded: Array<{ instrument: string; reason: string }>;
}

interface HeatmapAnswer {
  bucket: string | null;
  columns?: string[];
  slices: Array<[number, string, string[], string[], string[]]>;
}

export function levels(raw: unknown[] | undefined): Level[] {
  return (raw ?? []).map((l) => {
    const [price, size] = l as [string, string];
    return { price, size };
  });
}

/** a - b for decimal strings, exactly (scaled BigInt). */
export function decimalSub(a: string, b: string): string {
  const scale = Math.max(fracLen(a), fracLen(b));
  const diff = scaled(a, scale) - scaled(b, scale);
  const neg = diff < 0n;
  let digits = (neg ? -diff : diff).toString().padStart(scale + 1, "0");
  if (scale > 0) digits = `${digits.slice(0, -scale)}.${digits.slice(-scale)}`.replace(/\.?0+$/, "");
  return (neg ? "-" : "") + digits;
}

function fracLen(s: string): number {
  const i = s.indexOf(".");
  return i < 0 ? 0 : s.length - i - 1;
}

function scaled(s: string, scale: number): bigint {
  const neg = s.startsWith("-");
  const [int, frac = ""] = (neg ? s.slice(1) : s).split(".");
  const v = BigInt(int + frac.padEnd(scale, "0"));
  return neg ? -v : v;
}

/** (bid - ask) / (bid + ask) of the sizes over the top `n` levels. */
export function imbalance(bids: Level[], asks: Level[], n: number): number | null {
  const sum = (ls: Level[]) => ls.slice(0, n).reduce((a, l) => a + Number(l.size), 0);
  const b = sum(bids);
  const a = sum(asks);
  return a + b > 0 ? (b - a) / (b + a) : null;
}

function pairOf(instrument: string): string {
  return instrument.split(":").pop() ?? instrument;
}

function nsToSeconds(ts_ns: number | undefined): number {
  return ts_ns === undefined ? Date.now() / 1000 : ts_ns / 1e9;
}

export class BooksPanel {
  private title: HTMLElement;
  private canvas: HTMLCanvasElement;
  private bookEl: HTMLElement;
  private statsEl: HTMLElement;
  private consolidatedEl: HTMLElement;
  private instrument: string | null = null;
  private model: HeatmapModel | null = null;
  private socket: WebSocket | null = null;
  private timer: number | null = null;
  private generation = 0;
  private pendingRender = false;
  private heatmapLoading = false;

  constructor(
    readonly heatmapRoot: HTMLElement,
    readonly bookRoot: HTMLElement,
  ) {
    this.title = el("div", { class: "panel-sub" });
    this.canvas = el("canvas", { class: "heatmap", id: "heatmap-canvas" });
    heatmapRoot.append(this.title, this.canvas);
    this.statsEl = el("div", { class: "book-stats" });
    this.bookEl = el("div", { class: "book" });
    this.consolidatedEl = el("div", { class: "consolidated" });
    bookRoot.append(this.statsEl, this.bookEl, el("h3", {}, "Consolidated"), this.consolidatedEl);
    new ResizeObserver(() => this.scheduleRender()).observe(this.canvas);
  }

  async show(instrument: string): Promise<void> {
    if (instrument === this.instrument) return;
    const generation = ++this.generation;
    this.instrument = instrument;
    this.socket?.close(1000);
    this.socket = null;
    if (this.timer !== null) clearInterval(this.timer);
    this.title.textContent = `${instrument} · heatmap (last hour)`;
    const layer = dataLayer();
    layer.book = { instrument, book: null, consolidated: null, error: null };
    layer.heatmap = { cells: 0, slices: 0, renderMs: null, range: null, storedColumns: [], error: null };
    this.model = null;
    this.scheduleRender();
    await this.loadHeatmap(instrument, generation);
    await this.refreshBooks(instrument, generation);
    if (generation !== this.generation) return;
    this.timer = window.setInterval(() => {
      if (!this.model && !this.heatmapLoading) void this.loadHeatmap(instrument, generation);
      void this.refreshBooks(instrument, generation, true);
    }, REFRESH_MS);
    this.openStream(instrument, generation);
  }

  private async loadHeatmap(instrument: string, generation: number): Promise<void> {
    const end = Math.floor(Date.now() / 1000);
    const start = end - HEATMAP_WINDOW_S;
    const layer = dataLayer().heatmap;
    this.heatmapLoading = true;
    try {
      const answer = await getJson<HeatmapAnswer>("/v1/heatmap", { instrument, start, end, resolution: "1s" });
      if (generation !== this.generation || this.model) return;
      const slices = heatSlices(answer);
      layer.range = { start, end };
      if (slices.length === 0) {
        layer.error = "no stored buckets in the last hour";
        this.scheduleRender();
        return;
      }
      layer.error = null;
      const model = modelFor(slices, Number(answer.bucket));
      for (const s of slices) model.append(s.ts, s.points, s.mid);
      this.model = model;
      layer.storedColumns = model.columns.map((c) => [c.ts, c.cells.reduce((n, v) => n + (v > 0 ? 1 : 0), 0)]);
      this.scheduleRender();
    } catch (exc) {
      if (generation === this.generation) layer.error = unavailable("/v1/heatmap", exc);
      this.scheduleRender();
    } finally {
      this.heatmapLoading = false;
    }
  }

  private async refreshBooks(instrument: string, generation: number, consolidatedOnly = false): Promise<void> {
    const layer = dataLayer().book;
    const [book, consolidated] = await Promise.allSettled([
      consolidatedOnly && this.socket?.readyState === WebSocket.OPEN ? Promise.resolve(null) : getJson<BookAnswer>("/v1/book", { instrument, depth: DEPTH }),
      getJson<ConsolidatedAnswer>("/v1/book/consolidated", { pair: pairOf(instrument) }),
    ]);
    if (generation !== this.generation) return;
    if (book.status === "fulfilled" && book.value) this.onBook(book.value);
    else if (book.status === "rejected") {
      layer.error = unavailable("/v1/book", book.reason);
      this.statsEl.replaceChildren(el("span", { class: "muted" }, layer.error));
    }
    if (consolidated.status === "fulfilled") {
      layer.consolidated = consolidated.value;
      this.showConsolidated(consolidated.value);
    } else {
      this.consolidatedEl.replaceChildren(el("span", { class: "muted" }, unavailable("/v1/book/consolidated", consolidated.reason)));
    }
  }

  private openStream(instrument: string, generation: number): void {
    const socket = new WebSocket(socketUrl("/v1/book/stream", { instrument }));
    this.socket = socket;
    socket.onmessage = (event) => {
      if (generation !== this.generation) return;
      const msg = JSON.parse(String(event.data)) as BookAnswer & { type: string };
      if (msg.type === "snapshot") this.onBook(msg);
    };
    socket.onclose = () => {
      if (this.socket !== socket || generation !== this.generation) return;
      this.socket = null;
      window.setTimeout(() => generation === this.generation && this.openStream(instrument, generation), 2000);
    };
  }

  /** A current book: the table, the stats, and a live heatmap column bucketed like the stored ones. */
  private onBook(answer: BookAnswer): void {
    const bids = levels(answer.bids);
    const asks = levels(answer.asks);
    const layer = dataLayer().book;
    const spread = answer.spread ?? (bids[0] && asks[0] ? decimalSub(asks[0].price, bids[0].price) : null);
    layer.book = { ...answer, bids, asks, spread, imbalance: imbalance(bids, asks, 5) };
    this.showBook(bids, asks, answer, spread);
    if (this.model && bids.length && asks.length) {
      const points = [...bids, ...asks].map((l) => ({ price: Number(l.price), size: Number(l.size) }));
      const perRow = new Map<number, number>();
      for (const p of points) {
        const r = this.model.row(p.price);
        perRow.set(r, (perRow.get(r) ?? 0) + p.size);
      }
      const max = Math.max(...perRow.values());
      const cells = [...perRow].map(([r, size]) => ({ price: this.model!.priceLo + (r + 0.5) * this.model!.bucket, intensity: size / max }));
      this.model.append(Math.floor(nsToSeconds(answer.ts_ns)), cells, (Number(bids[0].price) + Number(asks[0].price)) / 2, true);
      this.scheduleRender();
    }
  }

  private showBook(bids: Level[], asks: Level[], answer: BookAnswer, spread: string | null): void {
    const maxSize = Math.max(...[...bids, ...asks].slice(0, DEPTH * 2).map((l) => Number(l.size)), 1e-12);
    const row = (l: Level, side: "bid" | "ask") =>
      el("div", { class: `level level-${side}` },
         el("span", { class: "depth", style: `width:${((Number(l.size) / maxSize) * 100).toFixed(1)}%` }),
         el("span", { class: "num" }, fmtPrice(l.price)), el("span", { class: "num size" }, l.size)); // prettier-ignore
    const askRows = asks.slice(0, DEPTH).reverse().map((l) => row(l, "ask"));
    const bidRows = bids.slice(0, DEPTH).map((l) => row(l, "bid"));
    const mid = el("div", { class: "level-mid" }, spread === null ? "no spread" : `spread ${spread}`);
    this.bookEl.replaceChildren(...askRows, mid, ...bidRows);
    const imb1 = imbalance(bids, asks, 1);
    const imb5 = imbalance(bids, asks, 5);
    const imb10 = imbalance(bids, asks, 10);
    const fmt = (v: number | null) => (v === null ? "–" : `${v >= 0 ? "+" : ""}${v.toFixed(3)}`);
    const age = answer.age_ms != null ? answer.age_ms / 1000 : answer.ts_ns !== undefined ? Date.now() / 1000 - nsToSeconds(answer.ts_ns) : null;
    this.statsEl.replaceChildren(
      stat("spread", spread ?? "–"),
      stat("imb 1/5/10", `${fmt(imb1)} ${fmt(imb5)} ${fmt(imb10)}`, (imb5 ?? 0) >= 0 ? "up" : "down"),
      stat("seq", answer.sequence == null ? "–" : String(answer.sequence)),
      stat("age", age == null ? "–" : fmtAge(age)),
      stat("verified", answer.verified === undefined ? "–" : answer.verified ? "yes" : "no", answer.verified === false ? "down" : ""),
    );
  }

  private showConsolidated(answer: ConsolidatedAnswer): void {
    const bids = levels(answer.bids);
    const asks = levels(answer.asks);
    const bestBid = answer.best_bid?.price ?? "–";
    const bestAsk = answer.best_ask?.price ?? "–";
    const rows = answer.venues.map((v) =>
      el("tr", {}, el("td", {}, el("span", { class: "dot dot-ok" }), v.instrument),
         el("td", { class: "num" }, fmtAge(v.age_ms / 1000)), el("td", { class: "muted small" }, ""))); // prettier-ignore
    for (const x of answer.excluded) {
      rows.push(el("tr", { class: "excluded" }, el("td", {}, el("span", { class: "dot dot-bad" }), x.instrument),
                   el("td", {}, "–"), el("td", { class: "muted small" }, x.reason))); // prettier-ignore
    }
    this.consolidatedEl.replaceChildren(
      el("div", { class: "book-stats" }, stat("best bid", fmtPrice(bestBid), "up"), stat("best ask", fmtPrice(bestAsk), "down"),
         stat("levels", `${bids.length} / ${asks.length}`)), // prettier-ignore
      el("table", { class: "grid-table" }, el("tr", {}, el("th", {}, "venue"), el("th", {}, "age"), el("th", {}, "")), ...rows),
    );
  }

  private scheduleRender(): void {
    if (this.pendingRender) return;
    this.pendingRender = true;
    requestAnimationFrame(() => {
      this.pendingRender = false;
      const layer = dataLayer().heatmap;
      if (!this.model) {
        const ctx = this.canvas.getContext("2d")!;
        this.canvas.width = this.canvas.clientWidth;
        this.canvas.height = this.canvas.clientHeight;
        ctx.fillStyle = "#0b0e14";
        ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
        ctx.fillStyle = "#5b6478";
        ctx.font = "12px ui-monospace, monospace";
        ctx.fillText(layer.error ?? "loading…", 16, 24);
        return;
      }
      const result = renderHeatmap(this.canvas, this.model);
      layer.cells = result.cells;
      layer.slices = this.model.columns.length;
      layer.renderMs = result.ms;
    });
  }
}

interface HeatSlice {
  ts: number;
  points: Array<{ price: number; intensity: number }>;
  mid?: number;
}

/** /v1/heatmap's rows (`[t_ms, side, price, size, intensity]`, ascending by time) as time slices;
 *  a slice's mid is taken halfway between its best bid bucket and best ask bucket. */
export function heatSlices(answer: HeatmapAnswer): HeatSlice[] {
  const bucket = Number(answer.bucket);
  const out: Array<HeatSlice & { bid: number; ask: number }> = [];
  for (const [tMs, side, prices, , intensities] of answer.slices) {
    const ts = Math.floor(tMs / 1000);
    let slice = out[out.length - 1];
    if (!slice || slice.ts !== ts) out.push((slice = { ts, points: [], bid: -Infinity, ask: Infinity }));
    for (let k = 0; k < prices.length; k++) {
      const p = Number(prices[k]);
      slice.points.push({ price: p, intensity: Number(intensities[k]) });
      if (side === "bid") slice.bid = Math.max(slice.bid, p);
      else slice.ask = Math.min(slice.ask, p);
    }
  }
  return out.map(({ ts, points, bid, ask }) => ({
    ts, points, mid: Number.isFinite(bid) && Number.isFinite(ask) ? (bid + ask + bucket) / 2 : undefined,
  })); // prettier-ignore
}

function modelFor(slices: HeatSlice[], bucket: number): HeatmapModel {
  let lo = Infinity;
  let hi = -Infinity;
  for (const s of slices) for (const p of s.points) {
    lo = Math.min(lo, p.price);
    hi = Math.max(hi, p.price);
  } // prettier-ignore
  if (!(bucket > 0)) {
    const prices = [...new Set(slices.flatMap((s) => s.points.map((p) => p.price)))].sort((a, b) => a - b);
    bucket = prices.length > 1 ? Math.min(...prices.slice(1).map((p, i) => p - prices[i]).filter((d) => d > 0)) : 1;
  }
  let rows = Math.floor((hi - lo) / bucket) + 1;
  if (rows > HEATMAP_ROWS_MAX) {
    // keep the rows around the latest prices
    const last = slices[slices.length - 1].points.map((p) => p.price);
    const center = last.reduce((a, b) => a + b, 0) / Math.max(1, last.length);
    lo = center - (HEATMAP_ROWS_MAX / 2) * bucket;
    rows = HEATMAP_ROWS_MAX;
  }
  return new HeatmapModel(Math.floor(lo / bucket) * bucket, bucket, rows + 1);
}

function unavailable(route: string, exc: unknown): string {
  if (exc instanceof ApiError && exc.status === 404) return `${route}: no order-book data here (404)`;
  return `${route}: ${exc}`;
}

function stat(name: string, value: string, cls = ""): HTMLElement {
  return el("div", { class: "stat" }, el("div", { class: "stat-name" }, name), el("div", { class: `stat-value ${cls}` }, value));
}
