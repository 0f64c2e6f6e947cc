// The dashboard: a header (instrument and interval picker, key state), then the chart, the order
// book, the heatmap, the replay controls and health, in one page served by the API at `/`.
// The instrument and interval live in the URL's fragment (`#instrument=...&interval=1m`), which a
// browser never sends to the server.

import "./style.css";
import { getJson, hasKey, setKeyAsker } from "./api";
import { INTERVAL_SECONDS } from "./bars";
import { BooksPanel } from "./books";
import type { OhlcvAnswer } from "./bars";
import { ChartPanel, fetchBars, firstPart, initialRange } from "./chart";
import { dataLayer } from "./datalayer";
import { HealthPanel } from "./health";
import { renderHeatmap, syntheticModel } from "./heatmap";
import { ReplayPanel, seconds, type Session } from "./replay";
import { el, keyDialog } from "./ui";

const DEFAULT_INSTRUMENT = "cccagg:BTC-USD";

function panel(id: string, title: string, extra?: HTMLElement): { section: HTMLElement; body: HTMLElement } {
  const body = el("div", { class: "panel-body" });
  const head = el("header", { class: "panel-head" }, el("h2", {}, title));
  if (extra) head.append(extra);
  return { section: el("section", { class: "panel", id }, head, body), body };
}

function readHash(): { instrument?: string; interval?: string } {
  const q = new URLSearchParams(location.hash.slice(1));
  return { instrument: q.get("instrument") ?? undefined, interval: q.get("interval") ?? undefined };
}

function writeHash(instrument: string, interval: string): void {
  history.replaceState(null, "", `#${new URLSearchParams({ instrument, interval })}`);
}

/** Instrument ids: `GET /v1/instruments` (the front door's list), else the UDF search. */
async function loadInstruments(): Promise<string[]> {
  try {
    const answer = await getJson<unknown>("/v1/instruments");
    const list = Array.isArray(answer) ? answer : ((answer as { instruments?: unknown[] }).instruments ?? []);
    const ids = list.map((x) => (typeof x === "string" ? x : String((x as { id?: string; instrument?: string }).id ?? (x as { instrument?: string }).instrument)));
    if (ids.length) return ids;
  } catch {
    // not there (yet): the UDF search lists the same table
  }
  const found = await getJson<Array<{ ticker?: string; full_name?: string; symbol?: string }>>("/udf/search", { query: "", limit: 100 });
  return found.map((s) => s.ticker ?? s.full_name ?? s.symbol ?? "").filter(Boolean);
}

interface EarlyFetch {
  instrument: string;
  interval: string;
  range: { start: number; end: number };
  first: { start: number; end: number };
  /** the parsed answer; null when it was not a 200 */
  body: Promise<OhlcvAnswer | null>;
}

/** The request index.html started before this script loaded, when it is the one the chart needs. */
function earlyBars(instrument: string, interval: string): { range: { start: number; end: number }; answer: Promise<OhlcvAnswer> } | null {
  const early = (window as unknown as { __candlekeepFirst?: EarlyFetch }).__candlekeepFirst;
  if (!early || early.instrument !== instrument || early.interval !== interval) return null;
  const range = early.range;
  const first = firstPart(range, INTERVAL_SECONDS[interval]);
  if (early.first.start !== first.start || early.first.end !== first.end) return null;
  // null: a 401 (fetchBars asks for the key), an error, or no network
  const answer = early.body.then((body) => body ?? fetchBars(instrument, interval, first));
  return { range, answer };
}

function main(): void {
  const scriptMs = performance.now();
  const layer = dataLayer();
  layer.scriptStartMs = scriptMs;
  // the first candle's bars are asked for before anything is built (see ChartPanel.show)
  const initial = readHash();
  let interval = initial.interval && INTERVAL_SECONDS[initial.interval] ? initial.interval : "1m";
  let instrument = initial.instrument ?? DEFAULT_INSTRUMENT;
  setKeyAsker((refused) => {
    layer.keyPrompts++;
    return keyDialog(refused).then((key) => {
      keyBadge.textContent = "key ✓";
      keyBadge.className = "badge badge-final";
      return key;
    });
  });
  const firstBars = earlyBars(instrument, interval) ?? (() => {
    const range = initialRange(interval);
    return { range, answer: fetchBars(instrument, interval, firstPart(range, INTERVAL_SECONDS[interval])) };
  })();
  // bench/web.py: the heatmap renderer on a synthetic day, and the floor any canvas raster pays
  // (one ImageData of the same size filled and put), measured on the same canvas
  layer.renderHeatmap = (slices, buckets) => {
    const canvas = document.getElementById("heatmap-canvas") as HTMLCanvasElement;
    const result = renderHeatmap(canvas, syntheticModel(slices, buckets));
    layer.heatmap.cells = result.cells;
    layer.heatmap.slices = slices;
    return result.ms;
  };
  layer.bareRaster = () => {
    const canvas = document.getElementById("heatmap-canvas") as HTMLCanvasElement;
    const t0 = performance.now();
    const ctx = canvas.getContext("2d")!;
    const image = ctx.createImageData(canvas.width, canvas.height);
    for (let i = 0; i < image.data.length; i += 4) image.data[i + 3] = 255;
    ctx.putImageData(image, 0, 0);
    return performance.now() - t0;
  };

  const app = document.getElementById("app")!;
  const instrumentSelect = el("select", { id: "instrument" });
  const intervals = el("div", { class: "seg", id: "intervals" });
  const keyBadge = el("span", { class: "badge", id: "key-state" }, "no key");
  const replayBadge = el("button", { class: "badge badge-replay hidden", id: "replay-on-chart", type: "button" });
  const header = el("header", { class: "top" },
    el("div", { class: "brand" }, el("span", { class: "logo" }, "◆"), "Candlekeep"),
    el("div", { class: "picker" }, instrumentSelect, intervals, replayBadge),
    el("nav", { class: "links" }, el("a", { href: "/docs", target: "_blank" }, "API docs"), el("a", { href: "/redoc", target: "_blank" }, "ReDoc"), keyBadge),
  ); // prettier-ignore
  const chartP = panel("panel-chart", "Chart");
  const bookP = panel("panel-book", "Order book");
  const heatP = panel("panel-heatmap", "Heatmap");
  const replayP = panel("panel-replay", "Replay");
  const healthP = panel("panel-health", "Health");
  app.append(header, el("main", { class: "grid" }, chartP.section, bookP.section, heatP.section, replayP.section, healthP.section));

  const chart = new ChartPanel(chartP.body);
  // The other panels are built once the first candle is on screen: the first frames lay out and
  // paint the chart alone (bench/web.py).
  let books: BooksPanel | null = null;

  const showLive = () => {
    replayBadge.classList.add("hidden");
    writeHash(instrument, interval);
    void chart.show({ instrument, interval });
    void books?.show(instrument);
  };
  for (const iv of Object.keys(INTERVAL_SECONDS)) {
    const b = el("button", { type: "button", "data-interval": iv, class: iv === interval ? "on" : "" }, iv);
    b.addEventListener("click", () => {
      interval = iv;
      for (const c of intervals.children) c.classList.toggle("on", (c as HTMLElement).dataset.interval === iv);
      const current = chart.current;
      if (current?.instrument.startsWith("replay:")) void chart.show({ ...current, interval });
      else showLive();
    });
    intervals.append(b);
  }
  instrumentSelect.addEventListener("change", () => {
    instrument = instrumentSelect.value;
    showLive();
  });
  replayBadge.addEventListener("click", showLive);

  const showReplay = (session: Session | null) => {
    if (!session) return showLive();
    const first = (session.instruments as string[] | undefined)?.[0] ?? instrument;
    const start = seconds(session.start) ?? 0;
    const end = seconds(session.end) ?? start + 3600;
    const step = INTERVAL_SECONDS[interval];
    replayBadge.textContent = `replay ${session.id.slice(0, 8)} · back to live ✕`;
    replayBadge.classList.remove("hidden");
    void chart.show({ instrument: `replay:${session.id}:${first}`, interval, range: { start: Math.floor(start / step) * step, end } });
  };

  // The chart's history goes first (the first candle is the figure that matters, bench/web.py);
  // the picker's list, health, books and replays follow once it is on screen (or the load failed).
  writeHash(instrument, interval);
  const firstDrawn = new Promise<void>((resolve) => chart.onFirstDraw(resolve));
  const firstLoad = chart.show({ instrument, interval }, firstBars);
  const afterFirstFrame = () => new Promise<void>((resolve) => requestAnimationFrame(() => requestAnimationFrame(() => resolve())));
  void Promise.race([firstDrawn, firstLoad]).finally(afterFirstFrame).finally(() => {
    books = new BooksPanel(heatP.body, bookP.body);
    void books.show(instrument);
    new HealthPanel(healthP.body).start();
    void new ReplayPanel(replayP.body, () => instrument, showReplay).start();
    void loadInstruments()
      .catch(() => [] as string[])
      .then((ids) => {
        if (!ids.includes(instrument)) ids.unshift(instrument);
        layer.instruments = ids;
        instrumentSelect.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
        instrumentSelect.value = instrument;
        if (hasKey()) {
          keyBadge.textContent = "key ✓";
          keyBadge.className = "badge badge-final";
        }
      });
  });
  instrumentSelect.replaceChildren(el("option", { value: instrument }, instrument));
  layer.builtMs = performance.now();
}

main();
