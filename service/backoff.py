"""The one capped exponential backoff formula, for everything that waits before trying again.

Kept free of heavy imports: the supervisor (which restarts dead children) uses it as well as
the database clients (:class:`service.store.outage.Backoff`).
"""

from __future__ import annotations

import random
from collections.abc import Callable

# Past this many doublings every delay is at its cap anyway; the bound keeps 2**n finite.
_MAX_DOUBLINGS = 64


def capped_exponential(
    first_s: float,
    cap_s: float,
    tries: int,
    *,
    jitter: float = 0.0,
    rng: Callable[[], float] = random.random,
) -> float:
    """The delay after ``tries`` earlier delays: ``first_s`` doubled each time, at most ``cap_s``.

    ``jitter`` (0 to 1) takes up to that share off at random, so that many clients failing
    together do not retry together; 0 keeps the delays exact (the supervisor's, whose tests
    time them).
    """
    step = min(cap_s, first_s * 2.0 ** min(max(tries, 0), _MAX_DOUBLINGS))
    if not jitter:
        return step
    return step * (1.0 - jitter + jitter * rng())
