"""Sweeps: a sweep of tutorial-size trials end to end, against the same jobs one at a time.

The service runs as the README starts it (``mnist-service run --workers 1`` on SQLite). A
client posts one sweep of ``trials`` trials (a grid over learning rates and seeds) and polls
``GET /sweeps/{id}`` until it has ended; then it submits the same trials as plain jobs, one at a
time, each waited for, as a user without sweeps would. Sweep and jobs alternate by round, so
the host's swings hit both alike. The worker packs compatible queued jobs
(``MNIST_PACK_MAX``); a second service with ``MNIST_PACK_MAX=1`` shows how much of the gain is
the packing and how much is only the queue staying full. Trials per second against the pack
size, and where a packed step's time goes, come from :mod:`benchmarks.packing` in this process.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.env import data_dir
from benchmarks.packing import measure as measure_packing
from benchmarks.packing import table as packing_table
from benchmarks.report import Section
from benchmarks.result_service import database, service
from benchmarks.stats import Series, fmt, fmt_ratio, ratio, verdict
from service.schemas import JobCreate
from service.settings import Settings
from workers.data import load_mnist

SPEEDUP_GOAL = 2.0  # one sweep of 8 trials against the same 8 jobs one at a time
DEFAULT_TRIALS = 8
POLL_EVERY_S = 0.05
PACK_MAX_DEFAULT = int(Settings.model_fields["pack_max"].default)


def sweep_grid(trials: int) -> dict[str, list[Any]]:
    """A grid of exactly ``trials`` trials: four learning rates times as many seeds as needed."""
    rates = [0.001, 0.002, 0.003, 0.004][: min(4, trials)]
    if trials % len(rates):
        raise ValueError(f"{trials} trials is not a multiple of {len(rates)} learning rates")
    return {"learning_rate": rates, "seed": list(range(trials // len(rates)))}


def grid_trials(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The grid's trials as JobCreate fields, in the grid's own order (learning rate major)."""
    return [{"learning_rate": lr, "seed": s} for lr in grid["learning_rate"] for s in grid["seed"]]


def _wait(client: httpx.Client, url: str, timeout_s: float) -> dict[str, Any]:
    """Poll ``url`` until its resource has ended; its last body."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        r = client.get(url)
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            if body["status"] != "succeeded":
                raise RuntimeError(f"{url} ended {body['status']}: {body}")
            return body
        time.sleep(POLL_EVERY_S)
    raise TimeoutError(f"{url} did not end in {timeout_s} s")


def run_sweep(
    client: httpx.Client, params: dict[str, Any], grid: dict[str, list[Any]], timeout_s: float
) -> float:
    """``POST /sweeps`` → the sweep has succeeded, in seconds."""
    began = time.perf_counter()
    r = client.post("/sweeps", json={"params": params, "grid": grid})
    r.raise_for_status()
    body = _wait(client, r.headers["Location"], timeout_s)
    if len(body["trials"]) != len(grid_trials(grid)):
        raise RuntimeError(f"the sweep ran {len(body['trials'])} trials")
    return time.perf_counter() - began


def run_one_by_one(
    client: httpx.Client, params: dict[str, Any], grid: dict[str, list[Any]], timeout_s: float
) -> float:
    """The same trials as plain jobs, each submitted once the previous one succeeded."""
    began = time.perf_counter()
    for trial in grid_trials(grid):
        r = client.post("/jobs", json={**params, **trial})
        r.raise_for_status()
        _wait(client, r.headers["Location"], timeout_s)
    return time.perf_counter() - began


@dataclass
class SweepFigures:
    """One service's rounds: the sweep, and the same jobs one at a time."""

    pack_max: int
    first: float = 0.0  # a fresh worker's first sweep, apart from the rounds
    sweep: Series = field(default_factory=lambda: Series("sweep", "s"))
    one_by_one: Series = field(default_factory=lambda: Series("one by one", "s"))

    @property
    def speedup(self) -> float:
        """How many times faster the sweep finished."""
        return ratio(self.one_by_one.median, self.sweep.median)


def measure_service(
    root: Path,
    data_root: Path,
    params: dict[str, Any],
    grid: dict[str, list[Any]],
    *,
    pack_max: int,
    rounds: int,
) -> SweepFigures:
    """A fresh service on a fresh SQLite database with this ``pack_max``: a first sweep, timed
    apart, then ``rounds`` rounds of (a sweep, the same jobs one at a time), the order
    alternating.

    The first sweep pays what a service that has been running has paid already (the thread
    tuner's first timings, the first pack's allocations): counted in a round, it made the
    first round's sweep up to twice the next one's, whichever side came first."""
    figures = SweepFigures(pack_max)
    timeout_s = 600.0
    root = root / f"pack-{pack_max}"
    with (
        database("sqlite", root) as url,
        service(url, root, data_root, pack_max=str(pack_max)) as svc,
    ):
        figures.first = run_sweep(svc.client, params, grid, timeout_s)
        for r in range(rounds):
            order = [("sweep", run_sweep), ("one by one", run_one_by_one)]
            for name, run in order if r % 2 == 0 else order[::-1]:
                seconds = run(svc.client, params, grid, timeout_s)
                (figures.sweep if name == "sweep" else figures.one_by_one).add(seconds)
            print(
                f"  sweeps pack {pack_max} round {r + 1}/{rounds}: sweep "
                f"{figures.sweep.values[-1]:.2f} s, "
                f"one by one {figures.one_by_one.values[-1]:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    return figures


def run_sweeps(
    section: Section,
    root: Path,
    *,
    rounds: int,
    trials: int = DEFAULT_TRIALS,
    params: dict[str, Any] | None = None,
    data_root: Path | None = None,
    pack_sizes: tuple[int, ...] = (1, 2, 4, 8, 16),
) -> list[SweepFigures]:
    """Measure and write the section; returns the end-to-end figures (packing on, then off).

    ``params``, ``data_root`` and ``pack_sizes`` shrink the run (the tests' small one).
    """
    params = params or {}
    data_root = data_root or data_dir()
    grid = sweep_grid(trials)
    packs = sorted({PACK_MAX_DEFAULT, 1}, reverse=True)
    measured = [
        measure_service(root, data_root, params, grid, pack_max=p, rounds=rounds) for p in packs
    ]
    on = measured[0]
    job = "the tutorial's default job" if not params else f"the job {params}"
    section.para(
        f"One sweep of {trials} trials ({job}, a grid over {len(grid['learning_rate'])} learning "
        f"rates × {len(grid['seed'])} seeds) from `POST /sweeps` to `succeeded`, against the "
        "same trials submitted as plain jobs one at a time, each waited for: `mnist-service run "
        "--workers 1` on SQLite, median of "
        f"{rounds} round(s), sweep and jobs alternating, after a first sweep of the fresh "
        "service timed apart. The worker packs up to MNIST_PACK_MAX compatible queued jobs into "
        "one stacked model step."
    )
    section.table(
        [
            "MNIST_PACK_MAX",
            "sweep",
            "one by one",
            "speed-up",
            "trials/s (sweep)",
            "first sweep (fresh service)",
        ],
        [
            [
                m.pack_max,
                fmt(m.sweep.median, "s"),
                fmt(m.one_by_one.median, "s"),
                fmt_ratio(m.speedup),
                fmt(trials / m.sweep.median),
                fmt(m.first, "s"),
            ]
            for m in measured
        ],
    )
    section.goal_table(
        [
            [
                f"a sweep of {trials} trials ≥ {SPEEDUP_GOAL:g}× faster than one at a time (CPU)",
                fmt_ratio(on.speedup),
                verdict(on.speedup >= SPEEDUP_GOAL),
            ]
        ]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_mnist(data_root, device=torch.device("cpu"), download=False)
        rows = measure_packing(data, pack_sizes, JobCreate.model_validate(params), rounds=1)
    finally:
        torch.set_num_threads(threads)
    section.para(
        "Trials per second against the pack size, in this process on one thread (the loops "
        "alone, nothing stored: `python -m benchmarks.packing --threads 1`), and where a packed "
        "step's time goes (torch.profiler over the step's labelled parts):"
    )
    section.lines += [packing_table(rows), ""]
    return measured
