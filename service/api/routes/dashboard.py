"""The dashboard: one page at ``/`` and its static files (no build step, no CDN)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import FileResponse

from service.api import dashboard

router = APIRouter(include_in_schema=False)

# Another site may not frame the dashboard (a page on another port framed it, its buttons
# under the attacker's), and a browser takes each file as the type it is sent as. No stricter
# policy: plotly's WebGL plots (the sweep's parallel coordinates) compile code at run time.
GUARDED = {
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}
# The page and its scripts change with the code: revalidate each time (ETag makes it cheap).
REVALIDATE = {"Cache-Control": "no-cache", **GUARDED}
# plotly.js changes only with the installed package.
CACHE_A_DAY = {"Cache-Control": "public, max-age=86400", **GUARDED}


@router.get("/")
def index() -> FileResponse:
    """The dashboard page."""
    return FileResponse(dashboard.page(), media_type="text/html", headers=REVALIDATE)


@router.get(f"/static/vendor/{dashboard.PLOTLY_FILE}")
def plotly_js() -> FileResponse:
    """plotly.js from the installed ``plotly`` package."""
    return FileResponse(dashboard.plotly_js(), media_type="text/javascript", headers=CACHE_A_DAY)


@router.get("/static/{name}")
def static_file(name: Annotated[str, Path(max_length=64)]) -> FileResponse:
    """The dashboard's scripts and styles."""
    return FileResponse(dashboard.static_file(name), headers=REVALIDATE)
