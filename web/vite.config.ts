// The dashboard's build: index.html + src/ -> dist/ (served by the API at `/`), plus the Swagger UI
// and ReDoc files copied from their npm packages into dist/docs/, so `/docs` and `/redoc` render
// with no network (api/web.py serves them from there). ReDoc's bundle names one remote file, the
// logo of its "powered by" link, which an <img> would fetch even when hidden: it is swapped for
// an inline SVG, so the page makes no request beyond the API.
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { defineConfig, type Plugin } from "vite";

const here = dirname(fileURLToPath(import.meta.url));

const DOCS_ASSETS: Array<[string, string]> = [
  ["node_modules/swagger-ui-dist/swagger-ui-bundle.js", "swagger-ui-bundle.js"],
  ["node_modules/swagger-ui-dist/swagger-ui.css", "swagger-ui.css"],
  ["node_modules/swagger-ui-dist/favicon-32x32.png", "favicon-32x32.png"],
  ["node_modules/redoc/bundles/redoc.standalone.js", "redoc.standalone.js"],
];

const REDOC_REMOTE_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg";
const LOCAL_LOGO =
  "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Cpath d='M8 1l7 7-7 7-7-7z' fill='%23f0b90b'/%3E%3C/svg%3E";

function docsAssets(): Plugin {
  return {
    name: "candlekeep-docs-assets",
    apply: "build",
    closeBundle() {
      const out = resolve(here, "dist/docs");
      mkdirSync(out, { recursive: true });
      for (const [from, to] of DOCS_ASSETS) copyFileSync(resolve(here, from), resolve(out, to));
      const redoc = resolve(out, "redoc.standalone.js");
      const text = readFileSync(redoc, "utf8");
      if (!text.includes(REDOC_REMOTE_LOGO)) throw new Error(`${REDOC_REMOTE_LOGO} is gone from ReDoc's bundle: check it for other remote files`);
      writeFileSync(redoc, text.split(REDOC_REMOTE_LOGO).join(LOCAL_LOGO));
    },
  };
}

export default defineConfig({
  base: "/",
  build: { outDir: "dist", emptyOutDir: true, sourcemap: false, chunkSizeWarningLimit: 400 },
  plugins: [docsAssets()],
});
