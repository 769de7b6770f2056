"""Settings for the API and the workers, read from environment variables prefixed ``MNIST_``."""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core.core_schema import ValidationInfo
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from service.clock import is_key_text
from service.schemas.sweeps import SWEEP_TRIALS_CEILING
from service.setting_names import say_misspelt

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
LogFormat = Literal["text", "json"]
ArtifactStore = Literal["database", "folder"]

# Bounds of MNIST_MAX_IMAGE_PIXELS. The ceiling is also Pillow's bomb guard in the API process
# (service/serving/imaging.py), far below Pillow's default of 89 Mpx.
IMAGE_PIXELS_FLOOR = 28 * 28
IMAGE_PIXELS_CEILING = 32_000_000

# Steps a training worker holds while the database cannot be written (MNIST_OUTAGE_BUFFER_STEPS):
# a few MB of host memory, minutes of training at the default batch size.
OUTAGE_BUFFER_STEPS = 100_000

MIN_API_KEY_CHARS, DAY_S, MIB = 16, 24 * 3600.0, 1024 * 1024
REFUSED_EXIT_STATUS = 2  # a process refuses its configuration (systemd: RestartPreventExitStatus)
# MNIST_MAX_DECODES's default is the core count up to this: a large image's decode holds tens
# of MB, and a burst must stay well under the API's memory goal on many cores.
MAX_DEFAULT_DECODES = 8
# MNIST_MAX_JOB_STEPS: a step row costs about 110 bytes in SQLite, so the default caps one job
# near 110 MB; the tutorial's jobs (471 steps), 16 epochs of all 60,000 images one at a time
# and every test's job fit. The largest job the fields allow is 6,000,000 steps (~660 MB).
DEFAULT_MAX_JOB_STEPS = 1_000_000


class Settings(BaseSettings):
    """Every knob of the service; one instance is shared by the API and the worker processes."""

    # No NaN or infinity: an infinite lease or grace passed every bound, then failed at run time.
    model_config = SettingsConfigDict(
        env_prefix="MNIST_", extra="ignore", frozen=True, allow_inf_nan=False
    )

    database_url: str = Field(
        default="sqlite:///./var/mnist.db",
        description="SQLAlchemy URL: a SQLite file by default, PostgreSQL across machines.",
    )
    data_dir: Path = Field(
        default=Path("./data"),
        description="torchvision's MNIST root: the IDX files live in <data_dir>/MNIST/raw.",
    )
    download: bool = Field(
        default=True,
        description="Let torchvision download MNIST when the files are missing.",
    )
    checkpoint_dir: Path = Field(
        default=Path("./var/models"),
        description="Where MNIST_ARTIFACTS=folder keeps weights and training states, and "
        "where models trained under it are read from.",
    )
    artifacts: ArtifactStore | Literal["auto"] = Field(
        default="auto",
        description=(
            "Where checkpoints and training states are written: in the database (machines "
            "share only the database), or as files in MNIST_CHECKPOINT_DIR (one machine, or a "
            "shared folder). auto: folder on SQLite, database on PostgreSQL."
        ),
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    device: DeviceName = "auto"

    # Worker behaviour.
    wakeups: bool = Field(
        default=True,
        description=(
            "Wake idle workers and event streams when a job is queued or progresses "
            "(LISTEN/NOTIFY on PostgreSQL, sockets beside a SQLite file); false: polling only."
        ),
    )
    poll_interval_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="How often an idle worker looks for a queued job without a wake-up.",
    )
    flush_interval_s: float = Field(default=0.25, gt=0, le=60)
    lease_s: float = Field(default=30.0, gt=0, le=DAY_S)  # a date this far on must be in range
    heartbeat_s: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=100)
    # "auto": the worker times its steps at 1, 2, 4… threads and keeps the fastest (workers/
    # tuning/threads.py): two win on idle cores and lose badly when another process wants one.
    torch_threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] | None = "auto"
    cuda_graphs: bool = Field(
        default=True,
        description="On a CUDA device, replay each full batch's training step from a CUDA graph.",
    )
    # Jobs a worker claims together and trains as one stacked model, one step for all
    # (workers/packed.py). On the 2-core CPU host, 8 jobs through a worker ran 1.3-1.4× faster
    # packed than one by one, and larger packs no faster (docs/benchmarks.md, "Packed
    # training"); 8 also packs a sweep of 8 trials whole. 1: one job at a time, as before.
    pack_max: int = Field(
        default=8,
        ge=1,
        le=1024,
        description=(
            "Most jobs a worker trains at once as one pack (same epochs, batch_size, "
            "trainset_size, testset_size); 1 turns packing off."
        ),
    )
    max_runtime_s: float | None = Field(
        default=DAY_S, gt=0, le=3650 * DAY_S, description="Fail a job that runs longer."
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        le=DAY_S,
        description="On SIGTERM, how long a worker may take to finish the current epoch.",
    )
    outage_buffer_steps: int = Field(
        default=OUTAGE_BUFFER_STEPS,
        ge=1,
        le=10_000_000,
        description=(
            "Training steps a worker keeps while the database is down; when this many wait, "
            "training pauses until the database is back (nothing is dropped)."
        ),
    )

    # API behaviour.
    api_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="API server processes; one per core serves predictions fastest.",
    )
    access_log: bool = Field(default=True, description="uvicorn's line per request.")
    model_cache_size: int = Field(default=8, ge=1, le=1024)
    model_resolve_ttl_s: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description=(
            "How long predict remembers which job an alias or the default names (0: ask the "
            "database every time). Aliases set through this process apply at once."
        ),
    )
    max_upload_bytes: int = Field(default=10 * MIB, ge=1024)
    events_poll_s: float = Field(
        default=2.0,
        ge=0.05,
        le=60,
        description="How often an open /jobs/{id}/events stream reads the database without a "
        "wake-up.",
    )
    fast_lanes: bool = Field(
        default=True,
        description=(
            "Answer plain predictions, metrics polls and job polls, and start event streams, in "
            "plain ASGI ahead of FastAPI (service/api/lanes/), and on SQLite let the HTTP "
            "protocol answer job and metrics polls itself (service/api/edge/quick.py); false "
            "leaves every request to the routes."
        ),
    )
    ready_write_probe_s: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description=(
            "How long /readyz reuses its last write probe (a committed one-row write that fails "
            "while the database refuses writes); 0 probes on every call."
        ),
    )
    ready_requires_worker: bool = Field(
        default=False,
        description="/readyz fails unless a worker has sent a heartbeat within MNIST_LEASE_S.",
    )

    # Both sides.
    log_format: LogFormat = Field(
        default="text", description="text for people, json for one JSON object per line."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    max_image_pixels: int = Field(
        default=16_000_000,
        ge=IMAGE_PIXELS_FLOOR,
        le=IMAGE_PIXELS_CEILING,
        description="Largest image (width × height) predict decodes; larger ones get 413.",
    )
    max_images_per_request: int = Field(default=16, ge=1, le=1024)
    max_decodes: int = Field(
        default_factory=lambda: min(os.cpu_count() or 1, MAX_DEFAULT_DECODES),
        ge=1,
        le=256,
        description=(
            "Images predict decodes at the same time, each request's in turn (default: the "
            "core count, at most 8); the others wait for a slot without holding a thread."
        ),
    )
    max_decode_queue: int = Field(
        default=64,
        ge=0,
        le=100_000,
        description="Predict requests that may wait for a decode slot; beyond, 429 + Retry-After.",
    )

    # Who may call the API (service/api/security.py) and how much they may send
    # (service/api/limits.py).
    api_key: SecretStr | None = Field(
        default=None,
        description="Bearer key for all but health, readiness and the dashboard's files.",
    )
    readonly_api_key: SecretStr | None = Field(
        default=None,
        description="A second key that may read everything and predict, but not start or cancel.",
    )
    allow_no_auth: bool = Field(
        default=False,
        description="Serve on a non-loopback address without a key (behind an auth proxy).",
    )
    docs_public: bool = Field(
        default=True, description="/docs, /redoc and /openapi.json answer without a key."
    )
    max_request_bytes: int = Field(
        default=16 * MIB, ge=4096, description="Largest request body, counted as it streams in."
    )
    max_form_parts: int = Field(default=32, ge=2, le=1000)
    max_form_field_bytes: int = Field(default=64 * 1024, ge=1, le=MIB)
    max_queued_jobs: int = Field(
        default=1000, ge=1, description="POST /jobs answers 429 while this many jobs wait."
    )
    max_job_steps: int = Field(
        default=DEFAULT_MAX_JOB_STEPS,
        ge=1,
        description="The most training steps one job may record (epochs × steps per epoch); "
        "POST /jobs answers 422 for a job over it.",
    )
    max_sweep_trials: int = Field(
        default=256,
        ge=1,
        le=SWEEP_TRIALS_CEILING,
        description="The most trials one sweep may have; POST /sweeps answers 422 over it.",
    )
    retention_days: int | None = Field(
        default=None,
        ge=1,
        le=36_500,  # a century; beyond it the cut-off date is out of range
        description="Delete ended jobs (and their steps and checkpoints) whose finished_at is "
        "older than this many days; aliased models are kept. Unset: keep everything.",
    )

    # The HTTP edge (service/api/edge/protocol.py): what uvicorn's protocol enforces before the app.
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        le=MIB,
        description="Request line and headers together; a larger block gets 431.",
    )
    max_request_line_bytes: int = Field(
        default=8 * 1024,
        ge=256,
        le=MIB,
        description="The request target (path and query); a longer one gets 414.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="From a connection's or request's first byte to the end of its headers (408).",
    )
    body_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Longest silence while a request body is being read (408).",
    )
    send_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Longest time a client may take none of an answer while some of it waits "
        "in the server to be sent; then the connection is reset.",
    )
    keepalive_timeout_s: float = Field(
        default=5.0, gt=0, le=3600, description="An idle keep-alive connection is closed after it."
    )
    max_connections: int = Field(
        default=10_000,
        ge=1,
        description="Open connections per API process; beyond it 503 with Retry-After.",
    )
    max_event_streams: int = Field(
        default=100,
        ge=1,
        description="Open /jobs/{id}/events streams per API process; beyond it 503.",
    )

    @field_validator("api_key", "readonly_api_key", "retention_days", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value: object) -> object:
        # `MNIST_API_KEY=` (compose's ${MNIST_API_KEY:-}) is no key; MNIST_RETENTION_DAYS= forever.
        return None if value == "" else value

    @field_validator("api_key", "readonly_api_key")
    @classmethod
    def _usable_key(cls, key: SecretStr | None) -> SecretStr | None:
        if key is None:
            return None
        value = key.get_secret_value()
        if len(value) < MIN_API_KEY_CHARS:
            raise ValueError(f"API keys must be at least {MIN_API_KEY_CHARS} characters long")
        if not is_key_text(value):
            raise ValueError("API keys must be printable ASCII without spaces")
        return key

    @model_validator(mode="after")
    def _consistent_limits_and_keys(self) -> Settings:
        if self.heartbeat_s >= self.lease_s:
            raise ValueError("MNIST_HEARTBEAT_S must be shorter than MNIST_LEASE_S")
        if self.readonly_api_key is not None:
            if self.api_key is None:
                raise ValueError("MNIST_READONLY_API_KEY needs MNIST_API_KEY (the full key) too")
            if self.readonly_api_key.get_secret_value() == self.api_key.get_secret_value():
                raise ValueError("MNIST_READONLY_API_KEY must differ from MNIST_API_KEY")
        if self.max_form_parts <= self.max_images_per_request:
            raise ValueError(
                "MNIST_MAX_FORM_PARTS must be larger than MNIST_MAX_IMAGES_PER_REQUEST "
                "(so a predict request over the image count gets predict's own answer)"
            )
        if self.max_request_line_bytes >= self.max_header_bytes:
            raise ValueError(
                "MNIST_MAX_REQUEST_LINE_BYTES must be smaller than MNIST_MAX_HEADER_BYTES "
                "(the request line is part of the header block)"
            )
        if self.max_event_streams > self.max_connections:
            raise ValueError(
                "MNIST_MAX_EVENT_STREAMS must not exceed MNIST_MAX_CONNECTIONS "
                "(every stream holds a connection)"
            )
        if self.max_request_bytes <= self.max_upload_bytes:
            raise ValueError(
                "MNIST_MAX_REQUEST_BYTES must be larger than MNIST_MAX_UPLOAD_BYTES "
                "(an upload travels with its multipart framing)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _resolve_artifacts(cls, data: Any) -> Any:
        """``auto`` picks by the database, before the frozen settings are built: a SQLite file
        is one machine's, its folder as shared, and files keep a state's bytes out of the
        flushes (docs/benchmarks.md); PostgreSQL's workers may share only the database."""
        if isinstance(data, dict) and data.get("artifacts", "auto") == "auto":
            url = str(data.get("database_url", cls.model_fields["database_url"].default))
            data = {**data, "artifacts": "folder" if url.startswith("sqlite") else "database"}
        return data

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, url: str) -> str:
        try:  # and the drivers installed (an async one passed here, then failed at start)
            driver = ((parsed := make_url(url)).get_backend_name(), parsed.get_driver_name())
        except ArgumentError:
            driver = None
        if driver not in (("sqlite", "pysqlite"), ("postgresql", "psycopg")):
            raise ValueError("MNIST_DATABASE_URL must be a sqlite:// or postgresql:// URL")
        return url

    @field_validator("log_level", "host", mode="before")
    @classmethod
    def _as_meant(cls, value: object, info: ValidationInfo) -> object:
        # A level in any case; "[::1]" as a URL writes an IPv6 address (uvicorn binds it bare).
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.strip("[]")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment. A refused environment ends
    the process: exit status 2, each setting's fault on stderr, never its value (a key may be
    among them); a name like a setting's misspelt is named too."""
    say_misspelt(os.environ, Settings.model_fields)
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors(include_input=False, include_url=False):
            name = "MNIST_" + str(error["loc"][0]).upper() if error["loc"] else "the settings"
            print(f"mnist-service: {name}: {error['msg']}", file=sys.stderr)
        raise SystemExit(REFUSED_EXIT_STATUS) from None
