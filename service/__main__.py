"""``python -m service``: the API alone, with the service's settings."""

from __future__ import annotations

import sys

import uvicorn

from service.app import create_app
from service.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    """Serve the API on MNIST_HOST:MNIST_PORT until interrupted."""
    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
