"""Pydantic request and response models: the API's contract with its clients."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from service.clock import JOB_ID_PATTERN
from service.status import JobStatus

# The largest integer every JSON reader (JavaScript's included) holds exactly.
MAX_SEED = 2**53 - 1
MAX_RUNTIME_S = 7 * 24 * 3600.0


def _integral(value: object) -> object:
    # JSON Schema counts 3.0 as an integer, so a client may send it and mean 3; strict models
    # still refuse 2.5, "3" and true.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral)]

_DECIMAL = re.compile(r"-?[0-9]+")


def _decimal(value: object) -> object:
    # A query string's integer as people write it: pydantic's lax mode also took "1_0", " 10 ",
    # "+10" and "10.0", each a different string for the same answer.
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        raise PydanticCustomError("int_parsing", "must be a whole number in decimal digits")
    return value


# Put after a query integer's bounds (``Annotated[int, Field(ge=..), IN_DECIMAL_DIGITS]``):
# before them, the bounds went to the validator and the schema lost its minimum and maximum.
IN_DECIMAL_DIGITS = BeforeValidator(_decimal)


class StrictModel(BaseModel):
    """Base of every API model: unknown fields are refused and floats must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class JobCreate(StrictModel):
    """The body of ``POST /jobs``: every field optional, the tutorial's values by default."""

    model_config = ConfigDict(
        strict=True,
        json_schema_extra={"examples": [{"epochs": 3, "batch_size": 64, "seed": 42}]},
    )

    epochs: JsonInt = Field(default=3, ge=1, le=100, description="Passes over the training set.")
    batch_size: JsonInt = Field(default=64, ge=1, le=4096, description="Images per optimiser step.")
    learning_rate: float = Field(default=1e-3, gt=0, le=1, description="Adam's learning rate.")
    trainset_size: JsonInt = Field(
        default=10_000, ge=1, le=60_000, description="The first N images of MNIST's train split."
    )
    testset_size: JsonInt = Field(
        default=1_000, ge=1, le=10_000, description="The first N images of MNIST's test split."
    )
    # The bounds sit on the integer, not the union, so the JSON schema carries them.
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_integral)] | None = Field(
        default=None,
        description="Makes the run reproducible (same seed and parameters, same losses on CPU).",
    )
    max_runtime_s: Annotated[float, Field(gt=0, le=MAX_RUNTIME_S)] | None = Field(
        default=None,
        description="Fail the job when it has run this long (default: the server's limit).",
    )


class JobRead(StrictModel):
    """A job as clients see it."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    status: JobStatus
    params: JobCreate
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    epoch: int = Field(description="Epochs finished.")
    step: int = Field(description="Training steps finished.")
    total_steps: int
    accuracy: float | None = Field(description="The latest validation accuracy.")
    device: str | None = Field(description="Where the job ran, e.g. cpu or cuda:0.")
    error: str | None
    attempt: int
    max_attempts: int
    worker: str | None = Field(description="The worker holding (or that last held) the job.")
    heartbeat_at: datetime | None
    sweep_id: str | None = Field(
        default=None, description="The sweep this job is a trial of; null for a job alone."
    )


class JobList(StrictModel):
    """A page of jobs, newest first; pass ``next`` as ``cursor`` for the following page."""

    jobs: list[JobRead]
    next: str | None


class StepRead(StrictModel):
    """The loss of one training step."""

    step: int
    epoch: int
    loss: float
    examples_seen: int


class EpochRead(StrictModel):
    """The test accuracy after one epoch."""

    epoch: int
    accuracy: float
    examples_seen: int


class MetricsRead(StrictModel):
    """Steps after ``after_step`` (in order, at most ``limit``) and every finished epoch."""

    job_id: str
    status: JobStatus
    attempt: int = Field(
        description="The run whose steps these are (0: none yet). When it changes between "
        "polls, a retry recorded a new run: read again from after_step=0."
    )
    steps: list[StepRead]
    epochs: list[EpochRead]
    next_after_step: int = Field(description="Pass as after_step to get only newer steps.")


class DigitProbability(StrictModel):
    """One digit and how probable the model finds it."""

    digit: int = Field(ge=0, le=9)
    probability: float


class Prediction(StrictModel):
    """The digit a model sees in an image."""

    digit: int = Field(ge=0, le=9)
    probabilities: list[float] = Field(
        min_length=10, max_length=10, description="Digit 0 to 9; they sum to 1."
    )
    job_id: str = Field(description="The job whose model answered.")
    top_k: list[DigitProbability] | None = Field(
        default=None, description="With ?top_k=k: the k most probable digits, most probable first."
    )


class PredictionBatch(StrictModel):
    """One prediction per uploaded image (the multipart ``files`` field), in upload order."""

    job_id: str = Field(description="The job whose model answered them all.")
    predictions: list[Prediction]


PixelRow = Annotated[
    list[Annotated[float, Field(ge=0, le=255)]], Field(min_length=28, max_length=28)
]


class PixelsInput(StrictModel):
    """The JSON body of ``POST /predict``: one 28×28 image as rows of numbers 0–255."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"pixels": [[0] * 28] * 28}]},
    )

    pixels: list[PixelRow] = Field(
        min_length=28,
        max_length=28,
        description="28 rows of 28 numbers, 0 (black) to 255 (white), in MNIST's layout.",
    )


class ErrorBody(StrictModel):
    """What went wrong, for people and for programs."""

    code: str
    message: str
    details: list[dict[str, object]] | None = None
    request_id: str | None = Field(
        default=None, description="On 500s: the id the server logged the error under."
    )


class ErrorEnvelope(StrictModel):
    """Every error response has this shape."""

    error: ErrorBody


class Health(StrictModel):
    """Liveness."""

    status: Literal["ok"]


class WorkerRead(StrictModel):
    """A live worker process and the job it is running (if any)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    host: str
    pid: int
    device: str
    started_at: datetime
    heartbeat_at: datetime
    job_id: str | None = Field(description="The job it runs; a pack's first.")
    job_ids: list[str] = Field(description="Every job it runs now (a pack's several).")


class WorkerList(StrictModel):
    """Workers heard from within one lease."""

    workers: list[WorkerRead]


class ReadinessCheck(StrictModel):
    """One thing readiness depends on."""

    name: Literal["database", "migrations", "writes", "workers", "storage"]
    ok: bool
    detail: str


class Readiness(StrictModel):
    """Every readiness check passed; a failing one answers 503 with the checks as details."""

    status: Literal["ready"]
    checks: list[ReadinessCheck]


# --- models and aliases ----------------------------------------------------------------------

ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ModelRead(StrictModel):
    """A model version: a succeeded job and its trained weights."""

    job_id: str
    params: JobCreate
    accuracy: float | None = Field(description="The last epoch's validation accuracy.")
    created_at: datetime
    finished_at: datetime
    device: str | None = Field(description="Where it was trained.")
    checkpoint_bytes: int | None = Field(
        description="The size of the weights file; null when the file is missing."
    )
    aliases: list[str] = Field(description="The aliases that point at this model.")


class ModelList(StrictModel):
    """A page of models, newest first; pass ``next`` as ``cursor`` for the following page."""

    models: list[ModelRead]
    next: str | None


class AliasWrite(StrictModel):
    """The body of ``PUT /models/aliases/{name}``."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"job_id": "0192a3b4c5d6e7f8091a2b3c4d5e6f70"}]},
    )

    job_id: str = Field(pattern=JOB_ID_PATTERN, description="A succeeded job.")


class AliasRead(StrictModel):
    """A name pointing at a model."""

    name: str
    job_id: str
    updated_at: datetime


class AliasList(StrictModel):
    """Every alias, by name."""

    aliases: list[AliasRead]
