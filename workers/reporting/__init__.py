"""What the training loop reports, split by job: buffering and persistence (``buffer``),
when a job must stop (``policy``), what a person watching sees (``display``), and the
``Reporter`` that the loop calls and that composes them."""

from workers.reporting.buffer import Claim
from workers.reporting.policy import (
    Diverged,
    Limits,
    RuntimeLimitExceeded,
    Shutdown,
    StorageFailed,
)
from workers.reporting.reporter import Reporter

__all__ = [
    "Claim",
    "Diverged",
    "Limits",
    "Reporter",
    "RuntimeLimitExceeded",
    "Shutdown",
    "StorageFailed",
]
