"""The web console: ``/`` is its page, ``/console/...`` its scripts and styles (plain files, no build).

The page talks to the same API as everyone else (relative URLs, so it also works under a path
prefix) and keeps the API key in the browser's localStorage.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Everything the page loads comes from here; thumbnails are blob: URLs (fetched with the API key).
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")

router = APIRouter(tags=["console"], include_in_schema=False)
_files = StaticFiles(directory=STATIC_DIR)


@router.get("/")
def console_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"})


@router.get("/console/{path:path}")
async def console_file(path: str, request: Request) -> Response:
    """A file under service/api/static (404 for anything else, '..' included)."""
    response = await _files.get_response(path, request.scope)
    response.headers["Cache-Control"] = "no-cache"  # revalidate by ETag: a new release is seen at once
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
