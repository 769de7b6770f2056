"""The command line (``mnist-service``): its commands, its HTTP client, the epoch bars."""

from __future__ import annotations

from collections.abc import Sequence

EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


def main(argv: Sequence[str] | None = None) -> int:
    """``mnist-service``. The commands are imported here, not where the script starts: a Ctrl-C
    while they load (httpx and pydantic, a few tenths of a second) ends the command as one while
    it runs does, with 130 and no traceback."""
    try:
        from service.cli.commands import main as run

        return run(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
