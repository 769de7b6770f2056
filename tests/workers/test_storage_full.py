"""A worker whose database's disk is full waits (an outage, retried) and then does its job:
nothing crashes and the job is not lost."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from service.status import JobStatus
from service.store.engines import make_engine, make_sessionmaker
from tests.conftest import fill_disk
from tests.jobs import queue_job, read_job
from tests.support import SMALL_TEST, SMALL_TRAIN, app_settings, wait_for
from workers.worker import Worker


def test_a_worker_rides_out_a_full_disk_and_trains_the_job_once_there_is_room(
    tiny_disk: Path, sqlite_template: Path, small_mnist: Path, tmp_path: Path
) -> None:
    shutil.copy(sqlite_template, tiny_disk / "mnist.db")
    settings = app_settings(
        f"sqlite:///{tiny_disk / 'mnist.db'}",
        tmp_path,  # the checkpoints on a disk with room: only the database's is full
        data_dir=small_mnist,
        poll_interval_s=0.05,
        flush_interval_s=0.05,
    )
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    try:
        job_id = queue_job(
            sessions, {"epochs": 1, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST}
        )
        filler = fill_disk(tiny_disk)
        worker = Worker(settings, sessions, show_progress=False)
        thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 1})
        thread.start()
        try:
            wait_for(
                lambda: worker.outage.down, timeout_s=60, what="the worker to meet the full disk"
            )
            assert thread.is_alive()
        finally:
            filler.unlink()
        thread.join(120)
        assert not thread.is_alive()
        job = read_job(sessions, job_id)
        assert job.status == JobStatus.SUCCEEDED, job.error
        assert not worker.outage.down
    finally:
        engine.dispose()
