"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), with their scripts and styles served from this package.

FastAPI's own pages load both from a CDN at a floating version, and ReDoc's fonts from Google: blank on
an air-gapped machine. These pages load pinned copies from ``/docs/assets`` (see
``static/docs/README.md``) and nothing from elsewhere: the system font stack stands in for Google's.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_DIR = Path(__file__).resolve().parent / "static" / "docs"
ASSETS_URL = "/docs/assets"
SWAGGER_UI_VERSION = "5.35.0"
REDOC_VERSION = "2.5.4"
# The pages may load only what this server serves. ReDoc 2 shows its maker's logo from a CDN in the side
# menu; the policy keeps the browser from asking for it (ReDoc then leaves the logo out). Both pages start
# with an inline script and style their elements inline; ReDoc runs its search in a blob: worker.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
)


def install_docs(app: FastAPI) -> None:
    """Serve the docs pages at ``/docs`` and ``/redoc`` and their assets at ``/docs/assets``.

    The app must be built with ``docs_url=None, redoc_url=None`` so FastAPI's CDN pages are not installed.
    """
    openapi_url = app.openapi_url or "/openapi.json"
    favicon = f"{ASSETS_URL}/favicon-32x32.png"
    # Appended to the URLs so a browser that cached one version's file fetches the next one's.
    swagger_v, redoc_v = f"?v={SWAGGER_UI_VERSION}", f"?v={REDOC_VERSION}"
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return _self_contained(
            get_swagger_ui_html(
                openapi_url=openapi_url,
                title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js{swagger_v}",
                swagger_css_url=f"{ASSETS_URL}/swagger-ui.css{swagger_v}",
                swagger_favicon_url=favicon,
                # No badge from the online validator: it would send the schema's URL off the machine.
                swagger_ui_parameters={"validatorUrl": None},
            )
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return _self_contained(
            get_redoc_html(
                openapi_url=openapi_url,
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js{redoc_v}",
                redoc_favicon_url=favicon,
                with_google_fonts=False,
            )
        )


def _self_contained(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page
