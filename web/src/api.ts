// The page's one door to the API: JSON over fetch, and WebSocket URLs, with the API key.
//
// Keys: the page starts without one. The first 401 opens the key dialog (once: every request that
// meets a 401 while it is open waits on the same answer), the key is kept in this module's memory
// only (no localStorage, no cookie, gone on reload) and sent as the `X-API-Key` header. Browsers
// cannot give a WebSocket headers, so sockets carry it as `?api_key=` (the API accepts it there;
// its access log redacts it). A key the API refuses opens the dialog again, saying so.

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly body: unknown = null,
  ) {
    super(message);
  }
}

type KeyAsker = (refused: boolean) => Promise<string>;

let apiKey: string | null = null;
let asking: Promise<string> | null = null;
let askKey: KeyAsker = () => Promise.reject(new ApiError(401, "an API key is required"));
let keyRefused = false;

/** The dialog that asks for a key (ui.ts installs it). */
export function setKeyAsker(asker: KeyAsker): void {
  askKey = asker;
}

export function hasKey(): boolean {
  return apiKey !== null;
}

async function keyAfter401(sentKey: string | null): Promise<string> {
  if (apiKey !== sentKey && apiKey !== null) return apiKey; // someone else already answered
  if (asking === null) {
    const refused = sentKey !== null || keyRefused;
    asking = askKey(refused).finally(() => {
      asking = null;
    });
  }
  const key = await asking;
  apiKey = key;
  return key;
}

function headers(extra?: HeadersInit): Headers {
  const h = new Headers(extra);
  h.set("Accept", "application/json");
  if (apiKey !== null) h.set("X-API-Key", apiKey);
  return h;
}

/** fetch() with the key, asking for one on 401; JSON body back, ApiError on any other failure. */
export async function request<T>(path: string, init: RequestInit = {}): Promise<T> {
  for (;;) {
    const sentKey = apiKey;
    const response = await fetch(path, { ...init, headers: headers(init.headers) });
    if (response.status === 401) {
      keyRefused = sentKey !== null;
      await keyAfter401(sentKey);
      continue;
    }
    const text = await response.text();
    let body: unknown = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      body = text;
    }
    if (!response.ok && !(response.status === 503 && path === "/health")) {
      throw new ApiError(response.status, describe(response.status, body), body);
    }
    return body as T;
  }
}

export function getJson<T>(path: string, params: Record<string, string | number | undefined> = {}): Promise<T> {
  return request<T>(withQuery(path, params));
}

export function postJson<T>(path: string, body?: unknown, method = "POST"): Promise<T> {
  return request<T>(path, {
    method,
    headers: body === undefined ? undefined : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

export function withQuery(path: string, params: Record<string, string | number | undefined>): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined) q.set(k, String(v));
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

/** ws(s)://<this host><path>?<params>[&api_key=] */
export function socketUrl(path: string, params: Record<string, string | number | undefined>): string {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const all = { ...params, api_key: apiKey ?? undefined };
  return `${scheme}//${location.host}${withQuery(path, all)}`;
}

function describe(status: number, body: unknown): string {
  if (body && typeof body === "object" && "detail" in body) {
    const detail = (body as { detail: unknown }).detail;
    if (typeof detail === "string") return `${status}: ${detail}`;
    if (Array.isArray(detail))
      return `${status}: ${detail.map((d) => (d && typeof d === "object" && "msg" in d ? String(d.msg) : String(d))).join("; ")}`;
  }
  return `HTTP ${status}`;
}
