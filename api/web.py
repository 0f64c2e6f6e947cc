"""The dashboard at `/` and the API docs at `/docs` and `/redoc`, from web/'s build, with no network.

    app = FastAPI(..., docs_url=None, redoc_url=None)
    install_web(app)          # after the routers: `/`, `/assets/*`, `/static/docs/*`, `/docs`, `/redoc`

`make web` (npm + Vite, web/README) builds web/dist: index.html and hashed assets/ for the page, and
docs/ with the Swagger UI and ReDoc bundles copied from their npm packages, which `/docs` and
`/redoc` load from `/static/docs/` instead of a CDN. A missing build is not an error for the API:
`/`, `/docs` and `/redoc` then answer with a page saying how to build it (the data routes work).
These paths hold no data, so they are open without a key (api/security.py STATIC_OPEN_*): the
page must load before it can ask for one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

DIST = Path(__file__).resolve().parents[1] / "web" / "dist"
DOCS_ASSETS = "/static/docs"

_MISSING = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Candlekeep: {what} not built</title>
<style>body{{background:#07090d;color:#d5dae3;font:14px/1.5 system-ui,sans-serif;padding:48px}}
code{{background:#10141d;padding:2px 6px;border-radius:3px}}</style></head><body>
<h1>Candlekeep</h1><p>The {what} is not built: <code>{dist}</code> has no <code>{file}</code>.</p>
<p>Build it with <code>make web</code> (needs Node.js and npm; <code>make up</code> does it when missing),
then reload. The API itself is up: <code>GET /v1/ohlcv</code>, <code>/udf/*</code>, <code>/health</code>.</p>
</body></html>"""


def install_web(app: FastAPI, dist: Path = DIST) -> None:
    index = dist / "index.html"
    docs = dist / "docs"
    openapi_url = app.openapi_url or "/openapi.json"

    def missing(what: str, file: Path) -> HTMLResponse:
        body = _MISSING.format(what=what, dist=dist, file=file.relative_to(dist))
        return HTMLResponse(body, status_code=503, headers={"Cache-Control": "no-store"})

    @app.get("/", include_in_schema=False)
    def dashboard() -> Response:
        if not index.is_file():
            return missing("dashboard", index)
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        if not (docs / "swagger-ui-bundle.js").is_file():
            return missing("API docs page", docs / "swagger-ui-bundle.js")
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        if not (docs / "redoc.standalone.js").is_file():
            return missing("API docs page", docs / "redoc.standalone.js")
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} API",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
            with_google_fonts=False,
        )

    # check_dir=False: the app starts before (or without) a build; a file appears once it is built
    app.mount("/assets", StaticFiles(directory=dist / "assets", check_dir=False), name="web-assets")
    app.mount(DOCS_ASSETS, StaticFiles(directory=docs, check_dir=False), name="docs-assets")
