"""``python -m service``: the API alone, with the service's settings."""

from __future__ import annotations

import sys

import uvicorn

from service.settings import get_settings

APP_FACTORY = "service.app:create_app"


def main(argv: list[str] | None = None) -> int:
    """Serve the API on MNIST_HOST:MNIST_PORT until interrupted."""
    settings = get_settings()
    # By import string: with several workers each process builds its own app (and engine,
    # model cache) from the same MNIST_* settings. uvicorn picks uvloop and httptools.
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.api_workers,
        access_log=settings.access_log,
        log_level="info",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
