"""The predict baseline: the simplest FastAPI endpoint, as a tutorial would write it.

``UploadFile``, PIL, the tutorial's transform, the same model (the checkpoint named by
BENCH_CHECKPOINT), one process: ``uvicorn benchmarks.baseline_app:app``. Its one concession:
one torch thread, as the service uses, so that the comparison is of code and serving rather
than of torch's thread default (two OpenMP threads per request collapse it to tens of
requests/s when other processes share the cores).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from torchvision import transforms

from service.ml import MNIST_MEAN, MNIST_STD, load_model

torch.set_num_threads(1)
model = load_model(Path(os.environ["BENCH_CHECKPOINT"]))
transform = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]
)
app = FastAPI()


@app.post("/predict")
async def predict(file: UploadFile = File(...)) -> dict[str, object]:  # noqa: B008 - FastAPI's idiom
    """The digit in the uploaded image and its probabilities."""
    image = Image.open(io.BytesIO(await file.read())).convert("L").resize((28, 28))
    x = transform(image).unsqueeze(0)
    with torch.no_grad():
        probabilities = torch.softmax(model(x), dim=1)[0]
    return {"digit": int(probabilities.argmax()), "probabilities": probabilities.tolist()}
