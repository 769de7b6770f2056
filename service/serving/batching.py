"""Micro-batching of predictions: the requests that are ready in one event-loop turn share a
forward pass.

Under load many predict requests reach the same event loop together. One forward pass of a
batch costs barely more than one of a single image (the MLP is tiny; torch's per-call overhead
dominates), so the batcher gathers the images of every request that asks during the current
turn of the loop, runs each model once over its share of them at the end of the turn, and
hands every request its own rows. A request alone in its turn waits for nothing: its batch is
itself. The forward runs on the loop: for at most :data:`MAX_BATCH_IMAGES` 28×28 images it is
cheaper than a hand-off to a thread.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field

import torch

from service.ml import SimpleMLP

MAX_BATCH_IMAGES = 256  # a larger gathering runs as several passes, keeping each one short


@dataclass
class _Request:
    images: torch.Tensor  # N×1×28×28, normalised
    done: asyncio.Future[list[list[float]]]


@dataclass
class _Gathering:
    """The requests of one model waiting for the end of the current loop turn."""

    model: SimpleMLP
    requests: list[_Request] = field(default_factory=list)


class ForwardBatcher:
    """Runs the forward passes asked for during one event-loop turn as one batch per model."""

    def __init__(self, max_batch_images: int = MAX_BATCH_IMAGES) -> None:
        self.max_batch_images = max_batch_images
        # Per event loop (a test client may run several): model key → its gathering.
        self._waiting: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, _Gathering]
        ] = weakref.WeakKeyDictionary()
        self.passes = 0  # forward passes run: fewer than requests when batching pays

    async def probabilities(
        self, key: str, model: SimpleMLP, images: torch.Tensor
    ) -> list[list[float]]:
        """Each image's ten probabilities (softmax in float64, so each row sums to 1 within
        1e-15) from ``model``, known to this batcher as ``key``."""
        loop = asyncio.get_running_loop()
        waiting = self._waiting.get(loop)
        if waiting is None:
            waiting = self._waiting[loop] = {}
        gathering = waiting.get(key)
        if gathering is None or gathering.model is not model:
            if gathering is not None:  # the same key now names another model: run the old one
                self._run(gathering)
            gathering = waiting[key] = _Gathering(model)
            loop.call_soon(self._run_key, waiting, key, gathering)
        request = _Request(images, loop.create_future())
        gathering.requests.append(request)
        return await request.done

    def _run_key(self, waiting: dict[str, _Gathering], key: str, gathering: _Gathering) -> None:
        if waiting.get(key) is gathering:
            del waiting[key]
        self._run(gathering)

    def _run(self, gathering: _Gathering) -> None:
        requests, gathering.requests = gathering.requests, []
        start = 0
        while start < len(requests):
            # At least one request per pass, however many images it brings.
            end, size = start, 0
            while end < len(requests) and (
                end == start or size + len(requests[end].images) <= self.max_batch_images
            ):
                size += len(requests[end].images)
                end += 1
            self._forward(gathering.model, requests[start:end])
            start = end

    def _forward(self, model: SimpleMLP, requests: list[_Request]) -> None:
        try:
            batch = torch.cat([r.images for r in requests]) if len(requests) > 1 else None
            with torch.inference_mode():
                logits = model(requests[0].images if batch is None else batch)
                rows: list[list[float]] = torch.softmax(logits.double(), dim=1).tolist()
            self.passes += 1
        except Exception as exc:  # noqa: BLE001 - every waiter gets it; none is left hanging
            for r in requests:
                if not r.done.done():
                    r.done.set_exception(exc)
            return
        start = 0
        for r in requests:
            end = start + len(r.images)
            if not r.done.done():  # a cancelled request (client gone) wants nothing
                r.done.set_result(rows[start:end])
            start = end
