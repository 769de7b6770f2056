"""``python -m service``: the API alone, with the service's settings."""

from __future__ import annotations

import sys

import uvicorn

from service.app import create_app
from service.logs import configure_logging
from service.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    """Serve the API on MNIST_HOST:MNIST_PORT until interrupted."""
    settings = get_settings()
    configure_logging(settings)
    # log_config=None: uvicorn's loggers propagate to the root handler set up above.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level.lower(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
