// The order-book heatmap on a canvas: time left to right, price bottom to top, each cell's
// intensity (0..1, normalized per time slice by the API, issue 11) as color. Columns are appended
// as live book buckets arrive. Rendering reduces many slices per pixel column to their maximum and
// writes one ImageData, so a day at 1 s (86,400 slices) x 200 buckets draws in one pass.

export interface HeatColumn {
  ts: number;
  /** intensity per price row, row 0 = lowest price; NaN or 0 = nothing there */
  cells: Float32Array;
  /** best bid and ask prices at this time, when known (drawn as a line) */
  mid?: number;
  /** from the live book, not the stored buckets */
  live?: boolean;
}

export class HeatmapModel {
  columns: HeatColumn[] = [];
  constructor(
    readonly priceLo: number,
    readonly bucket: number,
    readonly rows: number,
  ) {}

  row(price: number): number {
    return Math.floor((price - this.priceLo) / this.bucket);
  }

  /** Adds a time slice from (price, intensity) points; points outside the price window are dropped.
   *  A live column of the same second replaces the last live one; a stored slice is never replaced. */
  append(ts: number, points: Array<{ price: number; intensity: number }>, mid?: number, live = false): void {
    const cells = new Float32Array(this.rows);
    for (const p of points) {
      const r = this.row(p.price);
      if (r >= 0 && r < this.rows) cells[r] = Math.max(cells[r], p.intensity);
    }
    const last = this.columns[this.columns.length - 1];
    if (last && ts <= last.ts) {
      if (ts === last.ts && live && last.live) this.columns[this.columns.length - 1] = { ts, cells, mid, live };
      return; // older than what is drawn, or stored: history already has it
    }
    this.columns.push({ ts, cells, mid, live });
  }
}

// 256-entry color ramp: near-black blue -> blue -> cyan -> yellow -> white (Bookmap-like)
const RAMP = (() => {
  const stops: Array<[number, number, number, number]> = [
    [0.0, 11, 14, 20],
    [0.15, 18, 38, 92],
    [0.4, 20, 120, 190],
    [0.65, 40, 210, 200],
    [0.85, 250, 220, 60],
    [1.0, 255, 255, 240],
  ];
  const out = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const t = i / 255;
    let k = 0;
    while (k < stops.length - 2 && t > stops[k + 1][0]) k++;
    const [t0, r0, g0, b0] = stops[k];
    const [t1, r1, g1, b1] = stops[k + 1];
    const f = (t - t0) / (t1 - t0);
    out[i * 3] = r0 + (r1 - r0) * f;
    out[i * 3 + 1] = g0 + (g1 - g0) * f;
    out[i * 3 + 2] = b0 + (b1 - b0) * f;
  }
  return out;
})();

export interface RenderResult {
  cells: number; // cells with a nonzero intensity that were painted
  ms: number;
}

const AXIS_W = 64; // price labels on the right
const AXIS_H = 18; // time labels at the bottom

/** Paints `model` on `canvas` (CSS size; device pixels handled here). */
export function renderHeatmap(canvas: HTMLCanvasElement, model: HeatmapModel): RenderResult {
  const t0 = performance.now();
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || 800;
  const cssH = canvas.clientHeight || 300;
  canvas.width = Math.round(cssW * dpr);
  canvas.height = Math.round(cssH * dpr);
  const ctx = canvas.getContext("2d")!;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#0b0e14";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const plotW = Math.max(1, canvas.width - Math.round(AXIS_W * dpr));
  const plotH = Math.max(1, canvas.height - Math.round(AXIS_H * dpr));
  const cols = model.columns;
  const n = cols.length;
  if (n === 0) return { cells: 0, ms: performance.now() - t0 };

  // reduce: max intensity per (pixel column, row)
  const px = Math.min(plotW, n * Math.max(1, Math.floor(plotW / n)));
  const rows = model.rows;
  const grid = new Float32Array(px * rows);
  let painted = 0;
  for (let i = 0; i < n; i++) {
    const x = Math.min(px - 1, Math.floor((i * px) / n));
    const cells = cols[i].cells;
    const base = x * rows;
    for (let r = 0; r < rows; r++) {
      const v = cells[r];
      if (v > 0) {
        painted++;
        if (v > grid[base + r]) grid[base + r] = v;
      }
    }
  }
  // paint: each grid cell fills its pixel rectangle
  const image = ctx.createImageData(plotW, plotH);
  const data = image.data;
  const colW = plotW / px;
  for (let y = 0; y < plotH; y++) {
    const r = rows - 1 - Math.floor((y * rows) / plotH);
    for (let x = 0; x < plotW; x++) {
      const g = Math.min(px - 1, Math.floor(x / colW));
      const v = grid[g * rows + r];
      const c = v > 0 ? Math.min(255, Math.max(24, Math.round(Math.pow(v, 0.75) * 255))) * 3 : 0;
      const o = (y * plotW + x) * 4;
      data[o] = RAMP[c];
      data[o + 1] = RAMP[c + 1];
      data[o + 2] = RAMP[c + 2];
      data[o + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);

  // mid line
  ctx.strokeStyle = "rgba(255,255,255,0.55)";
  ctx.lineWidth = Math.max(1, dpr);
  ctx.beginPath();
  let started = false;
  for (let i = 0; i < n; i += Math.max(1, Math.floor(n / plotW))) {
    const mid = cols[i].mid;
    if (mid === undefined) continue;
    const x = ((i + 0.5) * plotW) / n;
    const y = plotH - ((mid - model.priceLo) / (model.bucket * rows)) * plotH;
    if (started) ctx.lineTo(x, y);
    else ctx.moveTo(x, y);
    started = true;
  }
  ctx.stroke();

  // axes
  ctx.fillStyle = "#8b94a7";
  ctx.font = `${11 * dpr}px ui-monospace, SFMono-Regular, Menlo, monospace`;
  ctx.textBaseline = "middle";
  const ticks = 6;
  for (let k = 0; k <= ticks; k++) {
    const price = model.priceLo + (model.bucket * rows * k) / ticks;
    const y = plotH - (plotH * k) / ticks;
    ctx.fillText(price.toFixed(model.bucket < 1 ? 2 : 0), plotW + 6 * dpr, Math.min(plotH - 6 * dpr, Math.max(6 * dpr, y)));
  }
  ctx.textBaseline = "top";
  for (let k = 0; k < 5; k++) {
    const i = Math.floor(((n - 1) * k) / 4);
    const label = new Date(cols[i].ts * 1000).toISOString().slice(11, 19);
    const x = Math.min(plotW - 60 * dpr, Math.max(0, (i * plotW) / n));
    ctx.fillText(label, x, plotH + 4 * dpr);
  }
  return { cells: painted, ms: performance.now() - t0 };
}

/** A synthetic day (slices x buckets) for the bench: a random-walk mid with depth around it. */
export function syntheticModel(slices: number, buckets: number): HeatmapModel {
  const model = new HeatmapModel(0, 1, buckets);
  let mid = buckets / 2;
  let seed = 12345;
  const rand = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
  const t0 = 1704067200;
  for (let i = 0; i < slices; i++) {
    mid = Math.min(buckets * 0.8, Math.max(buckets * 0.2, mid + (rand() - 0.5) * 0.6));
    const cells = new Float32Array(buckets);
    for (let r = 0; r < buckets; r++) {
      const d = Math.abs(r + 0.5 - mid);
      cells[r] = d < 0.5 ? 0 : Math.min(1, (0.1 + 0.9 * rand() * rand()) * Math.exp(-d / (buckets / 8)));
    }
    model.columns.push({ ts: t0 + i, cells, mid });
  }
  return model;
}
