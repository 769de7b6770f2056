"""``python -m benchmarks.plain_uvicorn``: ``python -m service`` on uvicorn's own httptools
protocol, without the service's edge (service/api/edge/protocol.py): the baseline the edge is
measured against. Everything else (settings, app, logging, descriptor limit, the quiet server)
is the service's."""

from __future__ import annotations

import sys

from uvicorn import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import __main__ as service_main
from service.api.edge import server

_serve = server.serve


class PlainProtocol(HttpToolsProtocol):
    """uvicorn's protocol, with the ``Date`` header the quiet server leaves to the protocol
    (:func:`service.api.edge.server.fresh_headers`, as the edge calls it)."""

    def data_received(self, data: bytes) -> None:
        """The Date of what this may answer, then uvicorn's own parsing."""
        server.fresh_headers(self.server_state, self.config)
        super().data_received(data)


def _plain_serve(config: Config) -> None:
    # By import string: each serving process (uvicorn's children included) loads it.
    config.http = "benchmarks.plain_uvicorn:PlainProtocol"
    _serve(config)


if __name__ == "__main__":
    server.serve = _plain_serve  # service/__main__.py calls it through the module
    sys.exit(service_main.main())
