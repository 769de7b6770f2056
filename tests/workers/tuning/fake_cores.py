"""A fake machine for the thread tuner's tests: each count's step time, a clock that steps and
waits advance, and the CPU that other processes take meanwhile."""

from __future__ import annotations

from workers.tuning.other_load import OtherLoad
from workers.tuning.threads import ThreadTuner


class Cores:
    """Each thread count's step time (seconds, or a cycle of them); ``others_share``: the part
    of a core other processes use while the clock runs (None: the machine gives no reading);
    ``runnable``: how many of them are runnable at a reading (None: a whole core's worth of
    the share, as a process that holds a core is always runnable and a light one rarely)."""

    def __init__(
        self,
        step_s: dict[int, float | list[float]],
        *,
        others_share: float | None = None,
        runnable: int | None = None,
    ) -> None:
        self.step_s = step_s
        self.others_share = others_share
        self.runnable = runnable
        self.others_s = 0.0
        self.now = 0.0
        self.threads = 0
        self.switches: list[int] = []
        self.switched_at: list[float] = []  # the clock at each of ``switches``
        self.steps = 0

    def clock(self) -> float:
        return self.now

    def others(self) -> OtherLoad | None:
        if self.others_share is None:
            return None
        runnable = int(self.others_share) if self.runnable is None else self.runnable
        return OtherLoad(cpu_s=self.others_s, runnable=runnable)

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.switches.append(n)
        self.switched_at.append(self.now)

    @property
    def changes(self) -> list[int]:
        """The counts set, each run of the same count once (``begin`` sets it at every job)."""
        return [n for i, n in enumerate(self.switches) if i == 0 or n != self.switches[i - 1]]

    def wait(self, seconds: float) -> None:
        """Time passes without a step (the worker between jobs)."""
        self.now += seconds
        self.others_s += (self.others_share or 0.0) * seconds

    def train(self, tuner: ThreadTuner, steps: int, *, beside_writes: bool = False) -> None:
        for _ in range(steps):
            step_s = self.step_s[self.threads]
            self.wait(step_s[self.steps % len(step_s)] if isinstance(step_s, list) else step_s)
            self.steps += 1
            tuner.step(beside_writes=beside_writes)


def tuner_on(
    cores: Cores,
    candidates: tuple[int, ...] = (1, 2),
    recheck_s: float = 1.0,
    probe_steps: int = 4,
) -> ThreadTuner:
    """A tuner on ``cores``: their clock, thread count and others' CPU; as many cores as the
    most candidate threads."""
    return ThreadTuner(
        candidates,
        probe_steps=probe_steps,
        recheck_s=recheck_s,
        clock=cores.clock,
        set_threads=cores.set_threads,
        others=cores.others,
        cores=candidates[-1],
    )
