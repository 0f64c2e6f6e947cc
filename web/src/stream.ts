// `WS /v1/stream` with reconnect: after a drop it reconnects (backoff 0.5 s doubling to 5 s) with
// `since=` the newest bar it has, so the API replays what was missed (and the forming bar) with no
// gap and no duplicate at the seam (api/routes/stream.py).

import { socketUrl } from "./api";
import type { StreamBar } from "./bars";

export type FeedState = "connecting" | "snapshot" | "live" | "reconnecting" | "closed";

export interface FeedEvents {
  bar(bar: StreamBar): void;
  state(state: FeedState, detail: string): void;
}

const MAX_SNAPSHOT_BARS = 10_000; // the API's cap on how far back `since` may reach

export class LiveFeed {
  private socket: WebSocket | null = null;
  private retryMs = 500;
  private timer: number | null = null;
  private stopped = false;
  reconnects = 0;
  messages = 0;

  constructor(
    readonly instrument: string,
    readonly interval: string,
    readonly step: number,
    private since: () => number | undefined,
    private events: FeedEvents,
  ) {}

  start(): void {
    this.stopped = false;
    this.open();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.socket?.close(1000);
    this.socket = null;
    this.events.state("closed", "");
  }

  private open(): void {
    let since = this.since();
    const floor = Math.floor(Date.now() / 1000 / this.step) * this.step - (MAX_SNAPSHOT_BARS - 2) * this.step;
    if (since !== undefined && since < floor && !this.instrument.startsWith("replay:")) since = floor;
    const url = socketUrl("/v1/stream", { instrument: this.instrument, interval: this.interval, since });
    this.events.state(this.reconnects ? "reconnecting" : "connecting", "");
    const socket = new WebSocket(url);
    this.socket = socket;
    socket.onopen = () => {
      this.events.state("snapshot", "");
    };
    socket.onmessage = (event) => {
      const msg = JSON.parse(String(event.data));
      this.messages++;
      if (msg.type === "bar") this.events.bar(msg.bar as StreamBar);
      else if (msg.type === "live") {
        this.retryMs = 500;
        this.events.state("live", msg.mode);
      }
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.stopped) return;
      const reason = event.reason || (event.code === 1006 ? "connection lost" : `closed ${event.code}`);
      this.events.state("reconnecting", reason);
      this.reconnects++;
      this.timer = window.setTimeout(() => this.open(), this.retryMs);
      this.retryMs = Math.min(this.retryMs * 2, 5000);
    };
  }
}
