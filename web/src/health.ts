// The health panel: `GET /health` (database, migrations, Redis, Kafka, each daemon's state) and
// `GET /v1/status` (per-instrument freshness, recent outages, dead-letter counts), every 5 s.

import { getJson } from "./api";
import { dataLayer } from "./datalayer";
import { el, fmtAge, fmtTime } from "./ui";

const REFRESH_MS = 5000;

interface Daemon {
  state: string;
  healthy: boolean | null;
  url: string | null;
  since?: string | null;
  detail?: string | null;
}

interface Health {
  status: string;
  database: string;
  migrations: string;
  redis: string;
  kafka: string;
  daemons: Record<string, Daemon>;
}

interface Status {
  now: number;
  instruments: Array<{ instrument: string; tracked: boolean; last_bar: number | null; age_s: number | null }>;
  outages: Array<{ source: string; started_at: string; ended_at: string | null; instruments: string[]; reason: string }>;
  deadletters: Record<string, Record<string, number> | null>;
}

export class HealthPanel {
  private components: HTMLElement;
  private daemons: HTMLElement;
  private freshness: HTMLElement;
  private outages: HTMLElement;
  private deadletters: HTMLElement;

  constructor(readonly root: HTMLElement) {
    this.components = el("div", { class: "tiles", id: "health-components" });
    this.daemons = el("div", { class: "tiles", id: "health-daemons" });
    this.freshness = el("table", { class: "grid-table" });
    this.outages = el("div", { class: "list" });
    this.deadletters = el("div", { class: "tiles", id: "health-deadletters" });
    root.append(
      el("div", { class: "health-col" }, el("h3", {}, "Components"), this.components, el("h3", {}, "Daemons"), this.daemons,
         el("h3", {}, "Dead letters"), this.deadletters), // prettier-ignore
      el("div", { class: "health-col" }, el("h3", {}, "Freshness (last 1m bar)"), this.freshness),
      el("div", { class: "health-col" }, el("h3", {}, "Recent outages"), this.outages),
    );
  }

  start(): void {
    void this.refresh();
    window.setInterval(() => void this.refresh(), REFRESH_MS);
  }

  async refresh(): Promise<void> {
    const layer = dataLayer();
    const [health, status] = await Promise.allSettled([getJson<Health>("/health"), getJson<Status>("/v1/status")]);
    if (health.status === "fulfilled") {
      layer.health = health.value;
      this.showHealth(health.value);
    } else {
      this.components.replaceChildren(tile("api", String(health.reason), "bad"));
    }
    if (status.status === "fulfilled") {
      layer.status = status.value;
      this.showStatus(status.value);
    } else {
      this.freshness.replaceChildren(el("tr", {}, el("td", { class: "muted" }, `status: ${status.reason}`)));
    }
  }

  private showHealth(h: Health): void {
    const level = (v: string, good: string[]) => (good.includes(v) ? "ok" : v === "not configured" ? "off" : "bad");
    this.components.replaceChildren(
      tile("api", h.status, h.status === "ok" ? "ok" : "bad"),
      tile("database", h.database, level(h.database, ["ok"])),
      tile("migrations", h.migrations, level(h.migrations, ["current"])),
      tile("redis", h.redis, level(h.redis, ["ok"])),
      tile("kafka", h.kafka, level(h.kafka, ["ok"])),
    );
    this.daemons.replaceChildren(
      ...Object.entries(h.daemons).map(([name, d]) => {
        const lvl = d.healthy === true ? "ok" : d.healthy === false ? "bad" : "off";
        const since = d.since ? `since ${d.since.slice(11, 19)}` : (d.detail ?? "");
        return tile(name, d.state, lvl, since);
      }),
    );
  }

  private showStatus(s: Status): void {
    const rows = s.instruments.map((i) => {
      const age = i.last_bar === null ? null : s.now - i.last_bar;
      const lvl = age === null ? "off" : age <= 180 ? "ok" : age <= 3600 ? "warn" : "bad";
      return el(
        "tr", { "data-instrument": i.instrument },
        el("td", {}, el("span", { class: `dot dot-${lvl}` }), i.instrument),
        el("td", { class: "muted" }, i.tracked ? "tracked" : ""),
        el("td", { class: "num" }, i.last_bar === null ? "no bars" : fmtTime(i.last_bar)),
        el("td", { class: `num age-${lvl}` }, age === null ? "–" : fmtAge(age)),
      ); // prettier-ignore
    });
    this.freshness.replaceChildren(
      el("tr", {}, el("th", {}, "instrument"), el("th", {}, ""), el("th", {}, "last bar (UTC)"), el("th", {}, "age")),
      ...(rows.length ? rows : [el("tr", {}, el("td", { class: "muted" }, "no instruments registered"))]),
    );
    this.outages.replaceChildren(
      ...(s.outages.length
        ? s.outages.map((o) =>
            el("div", { class: `list-item ${o.ended_at ? "" : "open"}` },
               el("div", {}, el("b", {}, o.source), " ", o.ended_at ? "" : el("span", { class: "badge badge-bad" }, "open")),
               el("div", { class: "muted" }, `${o.started_at.replace("T", " ").slice(0, 19)} → ${o.ended_at ? o.ended_at.replace("T", " ").slice(0, 19) : "now"}`),
               el("div", { class: "muted small" }, `${o.instruments.join(", ")} · ${o.reason}`)), // prettier-ignore
          )
        : [el("div", { class: "muted" }, "none in the last 7 days")]),
    );
    this.deadletters.replaceChildren(
      ...Object.entries(s.deadletters).map(([daemon, counts]) => {
        if (counts === null) return tile(daemon, "–", "off", "metrics unreachable");
        const total = Object.values(counts).reduce((a, b) => a + b, 0);
        const detail = Object.entries(counts).filter(([, n]) => n > 0).map(([r, n]) => `${r || "unlabelled"} ${n}`).join(" · ");
        return tile(daemon, String(total), total ? "warn" : "ok", detail || "none");
      }),
    );
  }
}

function tile(name: string, value: string, level: string, detail = ""): HTMLElement {
  return el("div", { class: `tile tile-${level}`, "data-name": name },
            el("div", { class: "tile-name" }, name), el("div", { class: "tile-value" }, value),
            el("div", { class: "tile-detail" }, detail)); // prettier-ignore
}
