"""A sweep's cost against its size, on SQLite, in this process: create N trials, claim and end
each in turn (every end settles the sweep), then delete the ended sweep beside FILES other
files in the checkpoint folder. Run as a file, ``PYTHONPATH`` choosing the checkout measured
(this script only imports what every version since sweeps has):

    PYTHONPATH=<checkout> python benchmarks/sweep_scale.py 2000 14000
"""

import sys
import tempfile
import time
from pathlib import Path

from service.clock import utcnow
from service.domain import sweeps
from service.schemas.sweeps import SweepCreate
from service.status import JobStatus
from service.store import migrations, queue_repo
from service.store.engines import make_engine, make_sessionmaker

N, FILES = int(sys.argv[1]), int(sys.argv[2])
root = Path(tempfile.mkdtemp())
url = f"sqlite:///{root}/b.db"
migrations.upgrade(url)
sessions = make_sessionmaker(make_engine(url))
folder = root / "checkpoints"
folder.mkdir()
for i in range(FILES):
    (folder / f"{i:032x}-1.pt").write_bytes(b"")
body = SweepCreate.model_validate({"grid": {"seed": list(range(N))}})
t = time.perf_counter()
with sessions() as s:
    made = sweeps.create(s, body, max_trials=N, max_attempts=1, max_queued=10**6, max_steps=10**6)
create_s = time.perf_counter() - t
t = time.perf_counter()
for _ in range(N):
    with sessions.begin() as s:
        job = queue_repo.claim_job(s, worker_id="w", lease_s=60, device="cpu", now=utcnow())
    assert job is not None
    with sessions.begin() as s:
        queue_repo.finish_job(
            s,
            job_id=job.id,
            attempt=job.attempt,
            worker_id="w",
            status=JobStatus.FAILED,
            now=utcnow(),
            checkpoint=None,
        )
end_s = time.perf_counter() - t
for trial in made.trials:
    (folder / f"{trial.job_id}-1-e1.resume.pt").write_bytes(b"")
t = time.perf_counter()
with sessions() as s:
    sweeps.delete(s, folder, made.id)
delete_s = time.perf_counter() - t
print(
    f"N={N} files={FILES}: create {create_s:.2f} s, claim+finish all {end_s:.2f} s "
    f"({end_s / N * 1000:.2f} ms a trial), delete {delete_s:.2f} s"
)
