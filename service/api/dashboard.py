"""The dashboard's files: the page, its scripts and styles, and plotly.js from its package."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from service.errors import NotFound

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(?:js|css|html|svg|png)$")
PLOTLY_FILE = "plotly.min.js"


def page() -> Path:
    """The dashboard's single page."""
    return STATIC_DIR / "index.html"


def static_file(name: str) -> Path:
    """One of the dashboard's own files, by plain name (no paths, so nothing else is served)."""
    path = STATIC_DIR / name
    if not STATIC_NAME.match(name) or not path.is_file():
        raise NotFound(f"no static file {name!r}")
    return path


def plotly_js() -> Path:
    """plotly.min.js as shipped in the ``plotly`` Python package: no CDN, works offline."""
    spec = importlib.util.find_spec("plotly")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "package_data" / PLOTLY_FILE
        if path.is_file():
            return path
    raise NotFound("plotly.js is not installed (pip install plotly)")
