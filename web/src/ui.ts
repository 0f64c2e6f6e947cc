// Small DOM and formatting helpers shared by the panels, and the API-key dialog.

type Attrs = Record<string, string>;

export function el<K extends keyof HTMLElementTagNameMap>(tag: K, attrs: Attrs = {}, ...children: Array<Node | string>): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

/** A decimal string for display: thousands grouped, every digit the API gave kept. */
export function fmtPrice(value: string): string {
  const [int, frac] = value.split(".");
  const grouped = int.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return frac === undefined ? grouped : `${grouped}.${frac}`;
}

export function fmtVolume(value: string): string {
  const n = Number(value);
  if (!Number.isFinite(n)) return value;
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(2)}K`;
  return n.toFixed(n >= 100 ? 1 : 4);
}

export function fmtAge(seconds: number): string {
  if (!Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 90) return `${s}s ago`;
  if (s < 5400) return `${Math.round(s / 60)}m ago`;
  if (s < 172800) return `${Math.round(s / 3600)}h ago`;
  return `${Math.round(s / 86400)}d ago`;
}

export function fmtTime(ts: number): string {
  return new Date(ts * 1000).toISOString().slice(0, 19).replace("T", " ");
}

/** Asks for an API key in a modal form; resolves with what was entered. */
export function keyDialog(refused: boolean): Promise<string> {
  return new Promise((resolve) => {
    const input = el("input", { type: "password", id: "api-key-input", autocomplete: "off", spellcheck: "false", placeholder: "API key" });
    const form = el(
      "form",
      { class: "key-form" },
      el("h2", {}, "API key required"),
      el("p", { class: "muted" }, refused ? "The API refused that key. Enter another." : "This Candlekeep API needs a key (CANDLEKEEP_API_KEYS). It is kept in this tab's memory only."),
      input,
      el("button", { type: "submit", id: "api-key-submit" }, "Use key"),
    );
    const backdrop = el("div", { class: "modal", id: "api-key-dialog" }, form);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      backdrop.remove();
      resolve(key);
    });
    document.body.append(backdrop);
    input.focus();
  });
}
