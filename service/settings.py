"""Settings for the API and the workers, read from environment variables prefixed ``MNIST_``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DeviceName = Literal["auto", "cpu", "cuda", "mps"]


class Settings(BaseSettings):
    """Every knob of the service; one instance is shared by the API and the worker processes."""

    model_config = SettingsConfigDict(env_prefix="MNIST_", extra="ignore", frozen=True)

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
    checkpoint_dir: Path = Field(default=Path("./var/models"))
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    device: DeviceName = "auto"

    # Worker behaviour.
    poll_interval_s: float = Field(default=0.5, gt=0, le=60)
    flush_interval_s: float = Field(default=0.25, gt=0, le=60)
    lease_s: float = Field(default=30.0, gt=0)
    heartbeat_s: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=100)
    # One intra-op thread: a batch of 64 through a 784-100-10 MLP is too small to split, and
    # a second OpenMP thread spin-waits against every other process on a small shared CPU
    # (3-20x slower jobs measured on 2 loaded cores; docs/benchmarks.md).
    torch_threads: int | None = Field(default=1, ge=1, le=256)

    # API behaviour.
    api_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="API server processes; one per core serves predictions fastest.",
    )
    access_log: bool = Field(default=True, description="uvicorn's line per request.")
    model_cache_size: int = Field(default=8, ge=1, le=1024)
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, url: str) -> str:
        if not url.startswith(("sqlite", "postgresql")):
            raise ValueError("MNIST_DATABASE_URL must be a sqlite:// or postgresql:// URL")
        return url

    @field_validator("heartbeat_s")
    @classmethod
    def _heartbeat_below_lease(cls, heartbeat_s: float, info) -> float:  # type: ignore[no-untyped-def]
        lease_s = info.data.get("lease_s")
        if lease_s is not None and heartbeat_s >= lease_s:
            raise ValueError("MNIST_HEARTBEAT_S must be shorter than MNIST_LEASE_S")
        return heartbeat_s


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
