"""The web page at ``/`` and its assets under ``/web/``: plain files shipped in the package, nothing from a CDN,
so the page works air-gapped. Kept out of the OpenAPI schema: it is for people, not clients."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parents[1] / "static" / "web"

# The browser itself refuses anything from another origin: a later edit that adds a CDN link fails loudly.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def install_web(app: FastAPI) -> None:
    """Serve the page at ``/`` and its script and stylesheet under ``/web/``."""

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(
            WEB_DIR / "index.html",
            media_type="text/html",
            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
        )

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
