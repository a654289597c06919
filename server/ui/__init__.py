"""The operator's console at /ui and Swagger UI at /docs, both served from files inside installed packages: no CDN,
no build step, so both work offline.

The console is plain HTML, CSS and JavaScript (server/ui/static, shipped as package data) that calls the server's
own API with the key typed into it; Swagger UI's files come from the swagger-ui-bundle-v2 package (Apache-2.0).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
DOCS_ASSETS = "/docs-assets"


def swagger_ui_dir() -> Path:
    """The directory of Swagger UI's files in the swagger-ui-bundle-v2 package."""
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


def install(app: FastAPI) -> None:
    """Serve /ui (the console) and /docs (Swagger UI, from local assets) on `app`; neither needs a key (the
    console asks for one and sends it with its own API calls)."""
    app.mount("/ui/", StaticFiles(directory=STATIC, html=True), name="ui")
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_dir()), name="docs-assets")

    @app.get("/ui", include_in_schema=False)
    async def console() -> RedirectResponse:
        return RedirectResponse("ui/")  # relative: the console's own links are relative to /ui/, behind a proxy too

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} API",
                                   swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon-32x32.png",
                                   oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
                                   swagger_ui_parameters={"validatorUrl": None})  # no call to swagger.io

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
