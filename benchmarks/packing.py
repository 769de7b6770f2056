"""Packed training: trials per second against the pack size, and where a packed step's time goes.

A pack of K tutorial-size jobs (:func:`workers.training.packing.train_packed`) against the
same K jobs
trained one after another by the worker's loop (:func:`workers.training.train.train`): same seeds,
learning rates and data (cached in this process), at one intra-op thread count, reports that
keep nothing. Each figure is the median of ``rounds`` runs, pack and solo alternating, so that
the machine's swings hit both alike. The split of a packed step comes from ``torch.profiler``
over the labels :meth:`workers.training.packing.Pack.step` puts on its parts.

Run: ``python -m benchmarks.packing [--threads N] [--sizes 1,2,4,8,16] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.env import load_average
from benchmarks.floor import CPU, cpu_mnist
from benchmarks.stats import median
from service.schemas import JobCreate
from workers.data import Mnist
from workers.resume import TrainingState
from workers.training.graphs import graph_backend
from workers.training.packing import Pack, PackedJob, train_packed
from workers.training.train import train

SIZES = (1, 2, 4, 8, 16)
PARTS = ("pack.forward", "pack.backward", "pack.adam")
PROFILED_STEPS = 40


class Discard:
    """A report that keeps nothing: the loops' own cost is what is measured."""

    def step(self, loss: torch.Tensor) -> None:
        """Drop the loss."""

    def epoch(self, epoch: int, accuracy: float, state: TrainingState) -> None:
        """Drop the accuracy."""


@dataclass(frozen=True)
class Rates:
    """K trials' wall times: packed, and one by one."""

    k: int
    packed_s: float
    solo_s: float

    @property
    def packed_rate(self) -> float:
        """Trials per second, packed."""
        return self.k / self.packed_s

    @property
    def solo_rate(self) -> float:
        """Trials per second, one at a time."""
        return self.k / self.solo_s


@dataclass(frozen=True)
class PackRow(Rates):
    """One pack size: wall times of the pack and of its jobs one by one, and the step split."""

    step_ms: float
    shares: dict[str, float]
    solo_extrapolated: bool = False  # the one-by-one time counts some trials at the others' pace


def trial(k: int, params: JobCreate) -> tuple[int, JobCreate]:
    """The k-th trial of a sweep over seeds and learning rates."""
    return k, params.model_copy(update={"learning_rate": 1e-3 * (1 + k % 4)})


def step_split(
    data: Mnist, k: int, params: JobCreate, device: torch.device = CPU
) -> tuple[float, dict[str, float]]:
    """A packed step's mean wall time (ms) and each part's share of it, from the profiler (the
    host's time in each part: on a card, the time to launch its kernels)."""
    jobs = [PackedJob(p, seed, Discard()) for seed, p in (trial(i, params) for i in range(k))]
    pack = Pack(jobs, data, device)
    pack.shuffle()
    starts = [(i * params.batch_size) % params.trainset_size for i in range(PROFILED_STEPS)]
    for start in starts[:5]:  # warm up
        pack.step(start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        began = time.perf_counter()
        for start in starts:
            pack.step(start)
        _synchronize(device)
        wall = time.perf_counter() - began
    spent = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in PARTS}
    shares = {part.removeprefix("pack."): spent.get(part, 0.0) / wall for part in PARTS}
    shares["other"] = max(0.0, 1 - sum(shares.values()))
    return wall / len(starts) * 1e3, shares


def _synchronize(device: torch.device) -> None:
    """Wait for a card's queued work, so that a timer stops after it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    data: Mnist,
    sizes: Sequence[int] = SIZES,
    params: JobCreate | None = None,
    rounds: int = 1,
    *,
    device: torch.device = CPU,
    solo_max: int | None = None,
) -> list[PackRow]:
    """For each pack size K: K trials packed, and the same K trials one after another.

    With ``solo_max``, at most that many trials run one by one and the rest are counted at
    their median pace (:attr:`PackRow.solo_extrapolated`): 256 solo runs on a lent card would
    spend its minutes on the slow side of the ratio. On a card both sides replay their steps
    from CUDA graphs, as the worker does by default (MNIST_CUDA_GRAPHS)."""
    params = params or JobCreate()
    rows = []
    for k in sizes:
        trials = [trial(i, params) for i in range(k)]
        solo_trials = trials[: solo_max or k]
        packed, solo = [], []
        for _ in range(rounds):
            _synchronize(device)
            began = time.perf_counter()
            jobs = [PackedJob(p, seed, Discard()) for seed, p in trials]
            train_packed(jobs, data, device, graph_backend(device, True))
            _synchronize(device)
            packed.append(time.perf_counter() - began)
            began = time.perf_counter()
            for seed, p in solo_trials:
                train(p, data, device, seed, Discard(), graphs=graph_backend(device, True))
            _synchronize(device)
            solo.append((time.perf_counter() - began) * k / len(solo_trials))
        step_ms, shares = step_split(data, k, params, device)
        rows.append(PackRow(k, median(packed), median(solo), step_ms, shares, len(solo_trials) < k))
    return rows


def table(rows: Sequence[PackRow]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| K | packed s | trials/s packed | one by one s | trials/s one by one | speed-up "
        "| packed step ms | forward | backward | Adam | other |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.shares
        lines.append(
            f"| {r.k} | {r.packed_s:.2f} | {r.packed_rate:.3f} | "
            f"{r.solo_s:.2f}{' (paced)' if r.solo_extrapolated else ''} | "
            f"{r.solo_rate:.3f} | {r.solo_s / r.packed_s:.2f}× | {r.step_ms:.2f} | "
            f"{s['forward']:.0%} | {s['backward']:.0%} | {s['adam']:.0%} | {s['other']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Measure and print the table, with the thread count and the machine's load."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="pack sizes")
    parser.add_argument("--rounds", type=int, default=1, help="runs per figure (median)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = cpu_mnist()
    before = load_average()
    rows = measure(data, [int(k) for k in args.sizes.split(",")], rounds=args.rounds)
    print(
        f"tutorial-size trials (10,000 images × 3 epochs, batch 64) on the CPU, "
        f"{args.threads} thread(s); load average {before} → {load_average()}"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
