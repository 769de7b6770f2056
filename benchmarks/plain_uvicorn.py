"""``python -m benchmarks.plain_uvicorn``: ``python -m service`` on uvicorn's own httptools
protocol, without the service's edge (service/api/edge.py): the baseline the edge is measured
against. Everything else (settings, app, logging, descriptor limit) is the service's."""

from __future__ import annotations

import sys
from typing import Any

import uvicorn

from service import __main__ as service_main

_run = uvicorn.run


def _plain_run(*args: Any, **kwargs: Any) -> None:
    kwargs["http"] = "httptools"
    _run(*args, **kwargs)


if __name__ == "__main__":
    uvicorn.run = _plain_run  # service/__main__.py calls uvicorn.run through the module
    sys.exit(service_main.main())
