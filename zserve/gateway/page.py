"""The chat page: ``GET /`` and ``GET /static/{name}``.

The page is plain HTML, CSS and JavaScript shipped as package data in
``zserve/gateway/static/`` (no build step, nothing from a CDN: it works
offline). It speaks to the gateway's own OpenAI API, so it needs no endpoint
of its own. Files are read once, when the app is built.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from zserve.gateway.errors import APIError

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The page changes with the package: let the browser revalidate, not guess.
_HEADERS = {"cache-control": "no-cache", "x-content-type-options": "nosniff"}


def load_static() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type) for every file in ``static/``."""
    files: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("zserve.gateway").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in TYPES:
            files[entry.name] = (entry.read_bytes(), TYPES[suffix])
    return files


def routes() -> list[Route]:
    files = load_static()

    def _file(name: str) -> Response:
        got = files.get(name)
        if got is None:
            err = APIError(f"no file {name!r}", "not_found")
            return Response(err.body(), status_code=404, media_type="application/json")
        return Response(got[0], media_type=got[1], headers=_HEADERS)

    async def index(request: Request) -> Response:
        return _file("index.html")

    async def static(request: Request) -> Response:
        return _file(request.path_params["name"])

    return [
        Route("/", index, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
    ]
