"""Which thread counts train to the same bits as one thread: the only counts the thread tuner
may switch among (:mod:`workers.tuning.threads`).

Matrix products split their sums across threads, and by default MKL splits them differently at
different counts, so a seeded job's losses would drift apart within a few steps of a switch.
Importing :mod:`service` turns on MKL's strict reproducible mode, in which they do not; this
checks it on this CPU, once per process, rather than trusting it.
"""

from __future__ import annotations

import logging
import os

import torch

from service.ml import IMAGE_SIDE_PX, NUM_CLASSES, SimpleMLP
from workers.training.train import make_optimizer, train_step

log = logging.getLogger("workers")

SAME_BITS_BATCHES = (64, 1024)  # the default batch and a large one...
SAME_BITS_STEPS = 2  # ...each trained this many steps (the second uses Adam's moments)


def training_bits(batch_size: int) -> list[torch.Tensor]:
    """The losses and the parameters after a few seeded training steps on random images, at
    the current thread count (the global random state is left as it was)."""
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SimpleMLP()
        optimizer = make_optimizer(model, 1e-3, cpu)
        images = torch.randn(batch_size, 1, IMAGE_SIDE_PX, IMAGE_SIDE_PX)
        labels = torch.randint(0, NUM_CLASSES, (batch_size,))
        losses = [train_step(model, optimizer, images, labels) for _ in range(SAME_BITS_STEPS)]
    return [*losses, *(p.detach() for p in model.parameters())]


def same_bits_counts(candidates: tuple[int, ...]) -> tuple[int, ...]:
    """The first candidate and those of the others at which training steps give its bits.

    A count outside them would make a seeded job's losses depend on when the tuner switched.
    """
    before = torch.get_num_threads()

    def bits_at(threads: int) -> list[list[torch.Tensor]]:
        torch.set_num_threads(threads)
        return [training_bits(batch_size) for batch_size in SAME_BITS_BATCHES]

    def same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
        return all(
            torch.equal(x, y)
            for xs, ys in zip(a, b, strict=True)
            for x, y in zip(xs, ys, strict=True)
        )

    try:
        reference = bits_at(candidates[0])
        kept = (candidates[0], *(n for n in candidates[1:] if same(bits_at(n), reference)))
    finally:
        torch.set_num_threads(before)
    if kept != candidates:
        log.warning(
            "torch threads: %s give other results than %d (MKL_CBWR=%s): kept to %s so that "
            "seeded jobs repeat their losses",
            ", ".join(str(n) for n in candidates if n not in kept),
            candidates[0],
            os.environ.get("MKL_CBWR", ""),
            ", ".join(str(n) for n in kept),
        )
    return kept
