"""Names in the environment that look like a setting misspelt: pydantic-settings ignores a
name it does not know, so ``MNIST_PROT=8001`` served on the default port without a word."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable, Mapping

PREFIX = "MNIST_"
# How alike a name must be to a setting's to be taken for it: MNIST_PROT is 0.9 like
# MNIST_PORT; the CLI's MNIST_URL (0.74) and the suite's MNIST_TEST_POSTGRES_URL are not.
CLOSE = 0.8


def misspelt(environ: Mapping[str, str], fields: Iterable[str]) -> list[tuple[str, str]]:
    """``(name, the setting it is likely meant as)`` for each ``MNIST_`` name of ``environ``
    that is no setting's but close to one's, in order."""
    known = [PREFIX + field.upper() for field in fields]
    found = []
    for name in sorted(environ):
        if name.startswith(PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=CLOSE)
            if close:
                found.append((name, close[0]))
    return found


def say_misspelt(environ: Mapping[str, str], fields: Iterable[str]) -> None:
    """Name each :func:`misspelt` name on stderr, with the setting it is likely meant as."""
    for name, meant in misspelt(environ, fields):
        print(f"mnist-service: {name} is not a setting (ignored): {meant}?", file=sys.stderr)
