// The replay panel (issue 9's `/v1/replays`): create a session (instruments, range, speed), then
// start, pause, resume, seek (a slider over the range), change speed and stop. While a session is
// shown, the chart shows `replay:<id>:<instrument>` over the session's range, and the panel polls
// `GET /v1/replays/{id}` every second for its state, replay clock and progress.
//
// Session fields read (tolerant of either spelling until the API settles): id, state, instruments,
// start, end (unix s or ISO), speed (number or "max"), clock | replay_clock, percent | percent_done,
// position {sent, total} | sent/total, rate | messages_per_s.

import { ApiError, getJson, postJson } from "./api";
import { dataLayer } from "./datalayer";
import { el, fmtTime } from "./ui";

const POLL_MS = 1000;
const SPEEDS = ["1", "10", "60", "600", "max"];

export type Session = Record<string, unknown> & { id: string; state: string };

export function seconds(v: unknown): number | null {
  if (typeof v === "number") return v > 1e12 ? Math.floor(v / 1e9) : v;
  if (typeof v === "string" && v) {
    if (/^\d+(\.\d+)?$/.test(v)) return Number(v);
    const t = Date.parse(v.endsWith("Z") || /[+-]\d\d:?\d\d$/.test(v) ? v : `${v}Z`);
    return Number.isNaN(t) ? null : t / 1000;
  }
  return null;
}

export function clockOf(s: Session): number | null {
  return seconds(s.clock ?? s.replay_clock ?? s.clock_ts ?? null);
}

function percentOf(s: Session): number | null {
  const p = s.percent ?? s.percent_done ?? s.progress;
  if (typeof p === "number") return p;
  const pos = s.position as { sent?: number; total?: number } | undefined;
  const sent = pos?.sent ?? (s.sent as number | undefined);
  const total = pos?.total ?? (s.total as number | undefined);
  return sent !== undefined && total ? (100 * sent) / total : null;
}

function toLocalInput(ts: number): string {
  return new Date(ts * 1000).toISOString().slice(0, 16);
}

function fromInput(v: string): number {
  return Date.parse(`${v}:00Z`) / 1000; // the inputs are UTC, like every time on the page
}

export class ReplayPanel {
  private form: HTMLFormElement;
  private instrumentsInput: HTMLInputElement;
  private startInput: HTMLInputElement;
  private endInput: HTMLInputElement;
  private speedSelect: HTMLSelectElement;
  private sessionSelect: HTMLSelectElement;
  private controls: HTMLElement;
  private clockEl: HTMLElement;
  private stateEl: HTMLElement;
  private progressBar: HTMLElement;
  private progressText: HTMLElement;
  private slider: HTMLInputElement;
  private liveSpeed: HTMLSelectElement;
  private errorEl: HTMLElement;
  private session: Session | null = null;
  private timer: number | null = null;
  private seeking = false;

  constructor(
    readonly root: HTMLElement,
    private currentInstrument: () => string | null,
    private showOnChart: (session: Session | null) => void,
  ) {
    const now = Math.floor(Date.now() / 1000 / 3600) * 3600;
    this.instrumentsInput = el("input", { id: "replay-instruments", placeholder: "cccagg:BTC-USD" });
    this.startInput = el("input", { id: "replay-start", type: "datetime-local", value: toLocalInput(now - 86400) });
    this.endInput = el("input", { id: "replay-end", type: "datetime-local", value: toLocalInput(now - 82800) });
    this.speedSelect = el("select", { id: "replay-speed" }, ...SPEEDS.map((s) => el("option", { value: s }, s === "max" ? "max" : `${s}×`)));
    this.speedSelect.value = "60";
    this.form = el("form", { class: "replay-form" },
      labelled("instruments", this.instrumentsInput), labelled("start (UTC)", this.startInput), labelled("end (UTC)", this.endInput),
      labelled("speed", this.speedSelect), el("button", { type: "submit", id: "replay-create" }, "Create")); // prettier-ignore
    this.sessionSelect = el("select", { id: "replay-session" });
    this.stateEl = el("span", { class: "badge", id: "replay-state" }, "no session");
    this.clockEl = el("div", { class: "replay-clock", id: "replay-clock" }, "––:––:––");
    this.progressBar = el("div", { class: "progress-fill" });
    this.progressText = el("span", { class: "muted small", id: "replay-progress" });
    this.slider = el("input", { type: "range", id: "replay-seek", min: "0", max: "1", step: "1", value: "0" });
    this.liveSpeed = el("select", { id: "replay-live-speed" }, ...SPEEDS.map((s) => el("option", { value: s }, s === "max" ? "max" : `${s}×`)));
    const button = (id: string, label: string, action: () => Promise<void>) => {
      const b = el("button", { type: "button", id: `replay-do-${id}`, class: "ctl" }, label);
      b.addEventListener("click", () => void this.run(id, action));
      return b;
    };
    this.controls = el("div", { class: "replay-controls" },
      button("start", "▶ Start", () => this.transition("start")), button("pause", "❚❚ Pause", () => this.transition("pause")),
      button("resume", "▶ Resume", () => this.transition("resume")), button("stop", "■ Stop", () => this.transition("stop")),
      this.liveSpeed); // prettier-ignore
    this.errorEl = el("div", { class: "error small", id: "replay-error" });
    root.append(
      this.form,
      el("div", { class: "replay-session-row" }, labelled("session", this.sessionSelect), this.stateEl),
      this.clockEl,
      el("div", { class: "progress" }, this.progressBar),
      this.progressText,
      this.slider,
      this.controls,
      this.errorEl,
    );
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      void this.run("create", () => this.create());
    });
    this.sessionSelect.addEventListener("change", () => void this.run("select", () => this.select(this.sessionSelect.value)));
    this.slider.addEventListener("input", () => {
      this.seeking = true;
      this.clockEl.textContent = fmtTime(Number(this.slider.value));
    });
    this.slider.addEventListener("change", () => void this.run("seek", () => this.seek(Number(this.slider.value))));
    this.liveSpeed.addEventListener("change", () => void this.run("speed", () => this.setSpeed(this.liveSpeed.value)));
  }

  async start(): Promise<void> {
    try {
      await this.refreshList();
    } catch (exc) {
      const missing = exc instanceof ApiError && exc.status === 404;
      this.errorEl.textContent = missing ? "/v1/replays: no replay API here (404)" : `replays: ${exc}`;
      dataLayer().replay.error = String(exc);
    }
  }

  private async run(name: string, action: () => Promise<void>): Promise<void> {
    const layer = dataLayer().replay;
    this.errorEl.textContent = "";
    layer.error = null;
    try {
      await action();
      layer.actions.push(name);
    } catch (exc) {
      this.errorEl.textContent = String(exc);
      layer.error = String(exc);
    }
  }

  private async refreshList(): Promise<void> {
    const answer = await getJson<Session[] | { sessions?: Session[]; replays?: Session[] }>("/v1/replays");
    const sessions = Array.isArray(answer) ? answer : (answer.sessions ?? answer.replays ?? []);
    const keep = this.session?.id;
    this.sessionSelect.replaceChildren(
      el("option", { value: "" }, sessions.length ? "— pick a session —" : "no sessions"),
      ...sessions.map((s) => el("option", { value: s.id }, sessionLabel(s))),
    );
    if (keep) this.sessionSelect.value = keep;
  }

  private async create(): Promise<void> {
    const instruments = (this.instrumentsInput.value || this.currentInstrument() || "").split(",").map((s) => s.trim()).filter(Boolean);
    const speedValue = this.speedSelect.value;
    const body = {
      instruments,
      start: fromInput(this.startInput.value),
      end: fromInput(this.endInput.value),
      speed: speedValue === "max" ? "max" : Number(speedValue),
    };
    const session = await postJson<Session>("/v1/replays", body);
    await this.refreshList();
    this.sessionSelect.value = session.id;
    this.use(session);
  }

  private async select(id: string): Promise<void> {
    if (!id) {
      this.use(null);
      return;
    }
    this.use(await getJson<Session>(`/v1/replays/${encodeURIComponent(id)}`));
  }

  private async transition(action: "start" | "pause" | "resume" | "stop"): Promise<void> {
    const s = this.requireSession();
    const answer = await postJson<Session | null>(`/v1/replays/${encodeURIComponent(s.id)}/${action}`);
    await this.poll(answer);
  }

  private async seek(time: number): Promise<void> {
    const s = this.requireSession();
    try {
      const answer = await postJson<Session | null>(`/v1/replays/${encodeURIComponent(s.id)}/seek`, { time });
      await this.poll(answer);
    } finally {
      this.seeking = false;
    }
  }

  private async setSpeed(speed: string): Promise<void> {
    const s = this.requireSession();
    const answer = await postJson<Session | null>(`/v1/replays/${encodeURIComponent(s.id)}`, { speed: speed === "max" ? "max" : Number(speed) }, "PATCH");
    await this.poll(answer);
  }

  private requireSession(): Session {
    if (!this.session) throw new Error("create or pick a session first");
    return this.session;
  }

  /** Shows `session` (null: none) and switches the chart to its instrument. */
  private use(session: Session | null): void {
    const changed = session?.id !== this.session?.id;
    this.session = session;
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
    if (session) {
      const start = seconds(session.start) ?? 0;
      const end = seconds(session.end) ?? start + 1;
      this.slider.min = String(start);
      this.slider.max = String(end);
      this.slider.step = "1";
      this.timer = window.setInterval(() => void this.poll(null).catch(() => undefined), POLL_MS);
    }
    this.draw();
    if (changed) this.showOnChart(session);
  }

  private async poll(answer: Session | null): Promise<void> {
    if (!this.session) return;
    const fresh = answer && typeof answer === "object" && "state" in answer ? answer : await getJson<Session>(`/v1/replays/${encodeURIComponent(this.session.id)}`);
    this.session = { ...this.session, ...fresh };
    this.draw();
  }

  private draw(): void {
    const layer = dataLayer().replay;
    const s = this.session;
    layer.session = s;
    layer.clock = s ? clockOf(s) : null;
    if (!s) {
      this.stateEl.textContent = "no session";
      this.stateEl.className = "badge";
      this.clockEl.textContent = "––:––:––";
      this.progressBar.style.width = "0%";
      this.progressText.textContent = "";
      return;
    }
    this.stateEl.textContent = s.state;
    this.stateEl.className = `badge badge-state-${s.state}`;
    const option = [...this.sessionSelect.options].find((o) => o.value === s.id);
    if (option) option.textContent = sessionLabel(s);
    const clock = clockOf(s);
    if (!this.seeking) {
      this.clockEl.textContent = clock === null ? "––:––:––" : fmtTime(clock);
      if (clock !== null) this.slider.value = String(clock);
    }
    const pct = percentOf(s);
    this.progressBar.style.width = `${Math.max(0, Math.min(100, pct ?? 0)).toFixed(1)}%`;
    const rate = (s.rate ?? s.messages_per_s) as number | undefined;
    const pos = s.position as { sent?: number; total?: number } | undefined;
    const speed = String(s.speed ?? "");
    if (document.activeElement !== this.liveSpeed && SPEEDS.includes(speed)) this.liveSpeed.value = speed;
    this.progressText.textContent = [
      pct === null ? null : `${pct.toFixed(1)}%`,
      pos?.sent !== undefined ? `${pos.sent.toLocaleString()} / ${(pos.total ?? 0).toLocaleString()} msgs` : null,
      rate === undefined ? null : `${Math.round(rate).toLocaleString()} msg/s`,
      speed ? `speed ${speed}` : null,
    ].filter(Boolean).join(" · ");
  }
}

function sessionLabel(s: Session): string {
  return `${s.id.slice(0, 8)} · ${s.state} · ${(s.instruments as string[] | undefined)?.join(",") ?? ""}`;
}

function labelled(label: string, input: HTMLElement): HTMLElement {
  return el("label", { class: "field" }, el("span", {}, label), input);
}
