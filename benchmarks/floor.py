"""The floor: the bare training loop on cached tensors, with nothing recorded or persisted.

Written out here rather than calling :func:`workers.training.train.train`, so that the reference the
service is measured against cannot move when the service's loop changes. With the same seed
it takes the same steps as the worker (same initialisation, same shuffles), so its accuracy
is the worker's exactly when the worker's loop is faithful.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.env import data_dir
from benchmarks.stats import Series
from benchmarks.tutorial import Trained
from service.ml import SimpleMLP
from service.schemas import JobCreate
from workers.data import Mnist, load_mnist
from workers.training.train import evaluate
from workers.tuning.threads import process_tuner

CPU = torch.device("cpu")


def floor_threads() -> tuple[int, ...]:
    """The thread counts the floor is timed at, the fastest one's time being the floor: the
    counts the worker's tuner chooses among on this machine (:func:`workers.tuning.threads.
    process_tuner`: 1 and 2 on two cores, powers of two up to its ``MAX_THREADS`` on more,
    less any that would change a seeded job's losses). A floor held to fewer threads than the
    worker may use flattered every ratio against it on a machine with cores to spare
    (docs/benchmarks.md)."""
    return process_tuner().candidates


def thread_count(threads: int) -> str:
    """A thread count in the reports' words: "1 thread", "2 threads"."""
    return f"{threads} thread{'s' if threads > 1 else ''}"


def floor_label(threads: int) -> str:
    """A floor's row in the reports: "floor, 2 threads"."""
    return f"floor, {thread_count(threads)}"


class Floors:
    """The floor of a run's rounds: one bare loop at each of :func:`floor_threads`'s counts a
    round; the fastest count's median is the floor."""

    def __init__(self) -> None:
        self.series = {t: Series(floor_label(t), "s") for t in floor_threads()}

    def run(self, data: Mnist, params: JobCreate, *, seed: int) -> None:
        """This round's run at each count (torch's thread count is left at the last one:
        :func:`floor_data` puts it back)."""
        for threads, series in self.series.items():
            torch.set_num_threads(threads)
            series.add(floor_train(data, params, seed=seed).seconds)

    @property
    def seconds(self) -> float:
        """The floor: the fastest count's median."""
        return min(s.median for s in self.series.values())

    @property
    def last_s(self) -> float:
        """The fastest count's time in the latest round."""
        return min(s.values[-1] for s in self.series.values())


def floor_threads_text(counts: tuple[int, ...] | None = None) -> str:
    """The floor's thread counts (``counts``, else :func:`floor_threads`) for a report's prose:
    "the faster of 1 and 2 threads"."""
    counts = counts or floor_threads()
    if len(counts) == 1:
        return thread_count(counts[0])
    names = [str(n) for n in counts]
    which = "faster" if len(names) == 2 else "fastest"
    return f"the {which} of {', '.join(names[:-1])} and {names[-1]} threads"


def floor_train(
    data: Mnist, params: JobCreate, *, seed: int = 0, device: torch.device | None = None
) -> Trained:
    """Fused Adam, no per-step host copy, accuracy after each epoch; losses are not kept."""
    device = device or CPU
    trainset_size, batch_size = params.trainset_size, params.batch_size
    x, y = data.train.images[:trainset_size], data.train.labels[:trainset_size]
    test = data.test.first(params.testset_size, "testset_size")
    started = time.perf_counter()
    torch.manual_seed(seed)
    shuffle = torch.Generator(device=device).manual_seed(seed)
    model = SimpleMLP().to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=params.learning_rate, fused=device.type in ("cpu", "cuda")
    )
    accuracy = 0.0
    for _epoch in range(params.epochs):
        model.train()
        order = torch.randperm(trainset_size, generator=shuffle, device=device)
        for start in range(0, trainset_size, batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        accuracy = evaluate(model, test)
    return Trained(time.perf_counter() - started, accuracy, [])


def cpu_mnist(data_root: Path | None = None) -> Mnist:
    """MNIST on the CPU from ``data_root``, else the benchmarks' own folder."""
    return load_mnist(data_root or data_dir(), device=CPU, download=False)


@contextlib.contextmanager
def floor_data(data_root: Path | None = None) -> Iterator[tuple[Path, Mnist]]:
    """The data set's folder (``data_root``, else the benchmarks' own) and MNIST on the CPU for
    the floor, until the block ends; torch's thread count is put back then (the floor sets its
    own at each run)."""
    root = data_root or data_dir()
    threads = torch.get_num_threads()
    try:
        yield root, cpu_mnist(root)
    finally:
        torch.set_num_threads(threads)
