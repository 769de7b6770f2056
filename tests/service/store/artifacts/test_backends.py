"""A deleted job's files in the checkpoint folder: exactly the ones that are its, whatever
else the folder holds, found by one listing of the folder for a whole batch of jobs."""

from __future__ import annotations

import os
import random
from pathlib import Path

from service.store.artifacts import backends


def globbed(folder: Path, job_id: str, checkpoint: str | None) -> set[str]:
    """The files of one job as the per-job removal found them (two globs and the names its
    row gives): what the batch's one listing must find, job by job."""
    names = {f"{job_id}.pt"}
    if checkpoint is not None and not backends.in_database(checkpoint):
        names.add(Path(checkpoint).name)
    for pattern in (f"{job_id}-*.pt", f".{job_id}*.tmp"):
        names.update(p.name for p in folder.glob(pattern))
    return names


def job_id(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(32))


def crowded_folder(folder: Path, rng: random.Random, ids: list[str]) -> None:
    """Every kind of name a job leaves, and names that only look like one."""
    for i, jid in enumerate(ids):
        for name in (
            f"{jid}-1.pt",
            f"{jid}-2-e3.resume.pt",
            f".{jid}-1.pt.x1y2.tmp",
            f".{jid}.tmp",
            f"{jid}.pt",
            f"{jid}-.pt",
            f"{jid}-1.pt.bak",  # not .pt
            f"{jid}1.pt",  # no dash
            f"{jid[:-1]}-1.pt",  # a shorter id
            f"x{jid}-1.pt",
            f"{jid}-1.PT",
            f".{jid}-1.pt.tmp.keep",
        ):
            if rng.random() < 0.8 or i == 0:
                (folder / name).write_bytes(b"")
    (folder / "mnist.db").write_bytes(b"")
    (folder / ".hidden.tmp").write_bytes(b"")


def test_a_batch_removes_what_each_jobs_globs_found_and_nothing_else(tmp_path: Path) -> None:
    rng = random.Random(7)
    for trial in range(20):
        folder = tmp_path / str(trial)
        folder.mkdir()
        ids = [job_id(rng) for _ in range(6)]
        crowded_folder(folder, rng, ids)
        gone = rng.sample(ids, 3)
        refs: dict[str, str | None] = {
            gone[0]: f"{gone[0]}-1.pt",
            gone[1]: f"db:{gone[1]}-1.pt",
            gone[2]: None,
        }
        expected = set(os.listdir(folder))
        for jid, ref in refs.items():
            expected -= globbed(folder, jid, ref)
        backends.remove_jobs_files(folder, refs)
        assert set(os.listdir(folder)) == expected


def test_one_jobs_removal_is_the_batchs_of_one(tmp_path: Path) -> None:
    rng = random.Random(3)
    ids = [job_id(rng) for _ in range(3)]
    crowded_folder(tmp_path, rng, ids)
    expected = set(os.listdir(tmp_path)) - globbed(tmp_path, ids[0], f"{ids[0]}-1.pt")
    backends.remove_job_files(tmp_path, ids[0], f"{ids[0]}-1.pt")
    assert set(os.listdir(tmp_path)) == expected


def test_a_missing_folder_has_nothing_to_remove(tmp_path: Path) -> None:
    backends.remove_jobs_files(tmp_path / "never-made", {"a" * 32: "a" * 32 + "-1.pt"})


def test_a_batch_lists_the_folder_once(tmp_path: Path, folder_scans: list[str]) -> None:
    """Two globs per job: a 256-trial sweep's files took 16 s beside 14,000 others."""
    rng = random.Random(5)
    ids = [job_id(rng) for _ in range(50)]
    crowded_folder(tmp_path, rng, ids)
    backends.remove_jobs_files(tmp_path, dict.fromkeys(ids))
    assert folder_scans == [str(tmp_path)]
    assert not [
        name for name in os.listdir(tmp_path) if name.endswith(".tmp") and name[1:33] in ids
    ]
