"""``python -m benchmarks.cold_job JOB_ID``: a fresh worker process runs its first job.

Built as ``python -m workers`` builds its worker (settings from MNIST_* variables), so the
job pays for reading and normalising MNIST. Prints one JSON line: the job's claim → terminal
status time and its status.
"""

from __future__ import annotations

import json
import sys

from benchmarks.jobs import claim_and_run
from service.settings import get_settings
from service.store.engines import make_engine, make_sessionmaker
from workers.worker import Worker


def main(argv: list[str]) -> int:
    """Claim the one queued job (``argv[0]``), run it, print how long it took."""
    (job_id,) = argv
    settings = get_settings()
    engine = make_engine(settings.database_url)
    try:
        outcome, seconds = claim_and_run(Worker(settings, make_sessionmaker(engine)), job_id)
    finally:
        engine.dispose()
    print(json.dumps({"seconds": seconds, "status": outcome.status}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
