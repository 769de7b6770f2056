"""The edge's own cost per request: uvicorn's httptools protocol against the edge's subclass,
in this process, fed keep-alive GETs through a transport that only counts what is written, to
an app that answers at once. No network, no service: what is left is the protocols' work."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.api.edge.protocol import EdgeProtocol

REQUEST = (
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
)
REQUESTS = 20_000


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name)

    def write(self, data: Any) -> None:
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0  # the client takes every byte at once

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _per_request_us(protocol: type[HttpToolsProtocol]) -> float:
    config = Config(app=_app, log_config=None, access_log=False)
    config.load()
    proto = protocol(config, ServerState(), {}, asyncio.get_running_loop())
    transport = _Transport()
    proto.connection_made(transport)
    started = time.perf_counter()
    for _ in range(REQUESTS):
        proto.data_received(REQUEST)
        await asyncio.sleep(0)  # the app's task runs and answers
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - started
    if transport.closing or transport.written < REQUESTS * len(b"ok"):
        raise RuntimeError(f"{protocol.__name__} did not answer every request")
    proto.connection_lost(None)
    return elapsed / REQUESTS * 1e6


def protocol_costs(runs: int) -> dict[str, list[float]]:
    """µs per request of each protocol, ``runs`` alternating rounds."""
    costs: dict[str, list[float]] = {"uvicorn's httptools": [], "the edge's": []}

    async def rounds() -> None:
        for _ in range(runs):
            costs["uvicorn's httptools"].append(await _per_request_us(HttpToolsProtocol))
            costs["the edge's"].append(await _per_request_us(EdgeProtocol))

    uvloop.run(rounds())
    return costs
