"""The predict floor: the service's own work for one raw image, with nothing around it.

A bare ASGI app (no framework, middlewares, database or validation) that does what the
service's fast lane does for an image — decode and lay it out
(:mod:`service.serving.imaging`), the forward pass batched per event-loop turn
(:class:`service.serving.batching.ForwardBatcher`), the JSON answer — served like the
service in production: ``uvicorn benchmarks.floor_predict_app:app --workers 2``.
What the service serves beyond this is what its features cost.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from service.api.asgi import send_json
from service.ml import load_model
from service.serving.batching import ForwardBatcher
from service.serving.predictor import images_to_tensor, json_bytes, prediction_body

torch.set_num_threads(1)
model = load_model(Path(os.environ["BENCH_CHECKPOINT"]))
batcher = ForwardBatcher()
JOB_ID = "0" * 32  # the answer has the service's shape, job id included


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """POST: predict the body's image; anything else: 404 (the benchmark's readiness probe)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["method"] != "POST":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    rows = await batcher.probabilities("model", model, images_to_tensor([b"".join(chunks)]))
    await send_json(send, json_bytes(prediction_body(rows[0], JOB_ID, None)))
