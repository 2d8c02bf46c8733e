"""Pages for people, served without any external asset (training clusters are often
air-gapped): Swagger UI at ``/docs`` and ReDoc at ``/redoc`` from the files the
``fastapi-offline`` wheel installs, and the compare page at ``/ui``.

The compare page is a client of the public HTTP API and nothing else: ``POST /encode`` (the
latent, its shape and size, the encode time), ``POST /decode?format=frames`` (the
reconstruction, the decode time) and ``POST /frames`` (``routes/frames.py``: the original
as the service decodes it, so the page's PSNR/SSIM are computed on the same pixels as
``ivvae eval``'s). Metrics, charts and the synchronised playback happen in the browser
(``static/compare.js``).

The app factory must build ``FastAPI(docs_url=None, redoc_url=None)`` and include
``router``: FastAPI's own ``/docs`` and ``/redoc`` load their scripts from a CDN.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

STATIC = Path(__file__).parent / "static"


def _docs_assets() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


# name -> (folder, media type): only these files are served.
_ASSETS: dict[str, tuple[str, str]] = {
    "swagger-ui-bundle.js": ("docs", "text/javascript"),
    "swagger-ui.css": ("docs", "text/css"),
    "redoc.standalone.js": ("docs", "text/javascript"),
    "favicon.png": ("docs", "image/png"),
    "compare.js": ("ui", "text/javascript"),
    "compare.css": ("ui", "text/css"),
}

router = APIRouter(include_in_schema=False)


def _openapi_url(request: Request) -> str:
    return str(request.scope.get("root_path", "")) + (request.app.openapi_url or "/openapi.json")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=_openapi_url(request), title=f"{request.app.title}: API",
        swagger_js_url="ui/assets/swagger-ui-bundle.js",
        swagger_css_url="ui/assets/swagger-ui.css", swagger_favicon_url="ui/assets/favicon.png",
        # The validator badge would call validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None})


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=_openapi_url(request), title=f"{request.app.title}: API",
                          redoc_js_url="ui/assets/redoc.standalone.js",
                          redoc_favicon_url="ui/assets/favicon.png", with_google_fonts=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("ui")


@router.get("/ui")
async def compare_page() -> FileResponse:
    return FileResponse(STATIC / "compare.html", media_type="text/html")


# ReDoc's sidebar shows a "by Redocly" logo fetched from their CDN: point it to ours.
_REDOC_LOGO = (b"https://cdn.redoc.ly/redoc/logo-mini.svg", b"ui/assets/favicon.png")


@functools.cache
def _redoc_js() -> bytes:
    return (_docs_assets() / "redoc.standalone.js").read_bytes().replace(*_REDOC_LOGO)


@router.get("/ui/assets/{name}")
async def asset(name: str) -> Response:
    if name not in _ASSETS:
        return Response(status_code=404)
    folder, media_type = _ASSETS[name]
    cache = {"Cache-Control": "public, max-age=3600"}
    if name == "redoc.standalone.js":
        return Response(await asyncio.to_thread(_redoc_js), media_type=media_type,
                        headers=cache)
    path = (_docs_assets() if folder == "docs" else STATIC) / name
    return FileResponse(path, media_type=media_type, headers=cache)
