"""Sweeps' contract: the body of ``POST /sweeps``, what ``GET /sweeps`` answers, and the one
expansion of a sweep into its trials (:func:`expand`), which the API and the CLI both run.

A sweep is a base :class:`JobCreate` and a search over some of its fields: a grid (every
combination) or a seeded random search. Every trial is an ordinary :class:`JobCreate`, so
every value is checked by the job's own rules, and a refusal names where the value sits
(``grid.learning_rate[1]``).
"""

from __future__ import annotations

import itertools
import math
import random
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, Strict, ValidationError, model_validator

from service.errors import InvalidInput
from service.schemas import ALIAS_PATTERN, MAX_SEED, JobCreate, JsonInt, StrictModel
from service.status import JobStatus, SweepStatus

# The ceiling of MNIST_MAX_SWEEP_TRIALS, and what the CLI checks before it knows the server's.
SWEEP_TRIALS_CEILING = 10_000
# The most values one field's list may hold, a grid's or a choice's: a grid of more could not
# run, and an unbounded choice (7 million values, each validated as a job's field and stored
# in the sweep's row) took 19 s to answer and made every listing of sweeps 34 MB.
MAX_FIELD_VALUES = SWEEP_TRIALS_CEILING

# The fields a sweep may vary: JobCreate's own (tests check that the two lists agree).
SweepField = Literal[
    "epochs",
    "batch_size",
    "learning_rate",
    "trainset_size",
    "testset_size",
    "seed",
    "max_runtime_s",
]
DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform", "choice")
# A distribution's ends, as strict as the job's fields ("2" and true are no numbers); the model
# itself cannot be strict: in strict mode a tuple must be one, and JSON sends lists.
Bound = Annotated[float, Strict()]
IntBound = Annotated[JsonInt, Strict()]
_JOB_FIELDS = JobCreate.model_json_schema()["properties"]


class Distribution(StrictModel):
    """Where a random search draws one field from: exactly one of the four."""

    log_uniform: tuple[Bound, Bound] | None = Field(
        default=None, description="[lo, hi], 0 < lo ≤ hi: uniform in log space."
    )
    uniform: tuple[Bound, Bound] | None = Field(default=None, description="[lo, hi], lo ≤ hi.")
    int_uniform: tuple[IntBound, IntBound] | None = Field(
        default=None, description="[lo, hi]: a whole number, both ends included."
    )
    choice: list[Any] | None = Field(
        default=None, min_length=1, max_length=MAX_FIELD_VALUES, description="One of these."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}")
        bounds = self.log_uniform or self.uniform or self.int_uniform
        if bounds is not None and bounds[0] > bounds[1]:
            raise ValueError(f"{given[0]}: lo must not be above hi")
        if self.log_uniform is not None and self.log_uniform[0] <= 0:
            raise ValueError("log_uniform: lo must be above 0")
        return self

    def draw(self, rng: random.Random) -> Any:
        """One value, from ``rng`` alone (so a seed gives the same draws)."""
        if self.choice is not None:
            return rng.choice(self.choice)
        if self.int_uniform is not None:
            return rng.randint(*self.int_uniform)
        if self.uniform is not None:
            return rng.uniform(*self.uniform)
        assert self.log_uniform is not None
        lo, hi = self.log_uniform
        # exp(log(x)) may round past an end that is also JobCreate's bound.
        return min(max(math.exp(rng.uniform(math.log(lo), math.log(hi))), lo), hi)


class RandomSearch(StrictModel):
    """``trials`` draws from ``space``, the same ones for the same seed."""

    model_config = ConfigDict(strict=True)  # as the job's fields: "2" and true are no counts

    trials: JsonInt = Field(ge=1, le=SWEEP_TRIALS_CEILING, description="How many trials.")
    seed: JsonInt = Field(default=0, ge=0, le=MAX_SEED, description="The draws' seed.")
    space: dict[SweepField, Distribution] = Field(
        min_length=1, description="Each field to vary and where to draw it from."
    )


class SweepCreate(StrictModel):
    """The body of ``POST /sweeps``: a base job and a grid or a random search over its fields."""

    model_config = ConfigDict(
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "params": {"epochs": 1},
                    "grid": {"learning_rate": [0.001, 0.002], "seed": [0, 1, 2, 3]},
                    "promote": "production",
                }
            ]
        },
    )

    params: JobCreate = Field(
        default_factory=JobCreate, description="The fields every trial shares (JobCreate)."
    )
    grid: (
        dict[SweepField, Annotated[list[Any], Field(min_length=1, max_length=MAX_FIELD_VALUES)]]
        | None
    ) = Field(
        default=None,
        min_length=1,
        description="Values to try per field; the trials are every combination.",
    )
    random: RandomSearch | None = None
    promote: str | None = Field(
        default=None,
        pattern=ALIAS_PATTERN,
        description="Point this model alias at the best trial when the sweep succeeds.",
    )

    @model_validator(mode="after")
    def _one_search(self) -> SweepCreate:
        if (self.grid is None) == (self.random is None):
            raise ValueError("give either grid or random (exactly one)")
        return self


def _invalid(loc: list[str | int], msg: str, **extra: Any) -> InvalidInput:
    where = ".".join(str(p) for p in loc if not isinstance(p, int))
    where += "".join(f"[{p}]" for p in loc if isinstance(p, int))
    return InvalidInput(f"{where}: {msg}", details=[{"loc": ["body", *loc], "msg": msg, **extra}])


def _job(base: dict[str, Any], values: dict[str, Any], loc: list[str | int]) -> JobCreate:
    """The trial ``base`` with ``values``, by JobCreate's own rules; 422 at ``loc`` if not."""
    try:
        return JobCreate.model_validate({**base, **values})
    except ValidationError as exc:
        raise _invalid(loc, exc.errors(include_url=False)[0]["msg"]) from None


def _too_many(loc: list[str | int], trials: int, max_trials: int) -> InvalidInput:
    return _invalid(
        loc,
        f"{trials} trials, at most {max_trials} (MNIST_MAX_SWEEP_TRIALS)",
        type="too_many_trials",
        trials=trials,
        max_trials=max_trials,
    )


def _grid(
    base: dict[str, Any], grid: dict[SweepField, list[Any]], max_trials: int
) -> list[JobCreate]:
    count = math.prod(len(values) for values in grid.values())
    if count > max_trials:
        raise _too_many(["grid"], count, max_trials)
    for name, values in grid.items():  # each value alone, so a refusal says which
        seen: dict[Any, int] = {}  # as the job takes it: 0.001 and 1e-3 are one value
        for i, value in enumerate(values):
            taken = getattr(_job(base, {name: value}, ["grid", name, i]), name)
            if taken in seen:  # its trials would be the ones of the first, trained again
                raise _invalid(["grid", name, i], f"the same value as item {seen[taken]}")
            seen[taken] = i
    names = list(grid)
    return [
        _job(base, dict(zip(names, combo, strict=True)), ["grid"])
        for combo in itertools.product(*grid.values())
    ]


def _takes_fractions(name: str) -> bool:
    prop = _JOB_FIELDS[name]
    return "number" in {prop.get("type"), *(o.get("type") for o in prop.get("anyOf", []))}


def _random(base: dict[str, Any], search: RandomSearch, max_trials: int) -> list[JobCreate]:
    """Plain ``random.Random(seed)`` draws: reproducible by seed alone with the standard
    library; a model-based sampler (Optuna's TPE) needs results between trials, which a sweep
    that queues every trial at once does not have."""
    if search.trials > max_trials:
        raise _too_many(["random", "trials"], search.trials, max_trials)
    for name, dist in search.space.items():
        loc: list[str | int] = ["random", "space", name]
        kind = next(k for k in DISTRIBUTIONS if getattr(dist, k) is not None)
        if kind in ("uniform", "log_uniform") and not _takes_fractions(name):
            raise _invalid([*loc, kind], f"{name} takes whole numbers: use int_uniform or choice")
        for i, value in enumerate(getattr(dist, kind)):
            _job(base, {name: value}, [*loc, kind, i])
    rng = random.Random(search.seed)
    names = [name for name in JobCreate.model_fields if name in search.space]  # a fixed order
    return [
        _job(base, {name: search.space[name].draw(rng) for name in names}, ["random", "space"])
        for _ in range(search.trials)
    ]


def expand(sweep: SweepCreate, *, max_trials: int) -> list[JobCreate]:
    """The sweep's trials, in order: 422 (:class:`InvalidInput`) naming the value that no job
    may have, or when there are more than ``max_trials`` of them.

    A grid is the cartesian product of its lists (the last field varying fastest); a random
    search draws each trial's fields in JobCreate's order from ``random.Random(seed)``.
    """
    base = sweep.params.model_dump()
    if sweep.grid is not None:
        return _grid(base, sweep.grid, max_trials)
    assert sweep.random is not None
    return _random(base, sweep.random, max_trials)


class TrialRead(StrictModel):
    """One trial of a sweep: an ordinary job (``GET /jobs/{job_id}`` has the rest)."""

    job_id: str
    params: JobCreate
    status: JobStatus
    epoch: int = Field(description="Epochs finished.")
    accuracy: float | None = Field(description="The latest validation accuracy.")


class BestTrial(StrictModel):
    """The succeeded trial of highest final accuracy (ties: the earliest created)."""

    job_id: str
    accuracy: float


class SweepSummary(StrictModel):
    """A sweep as listed: its search, its state, how many trials are in each state."""

    id: str
    status: SweepStatus
    params: JobCreate
    grid: dict[str, list[Any]] | None
    random: RandomSearch | None
    promote: str | None
    created_at: datetime
    finished_at: datetime | None
    trials_by_status: dict[JobStatus, int]
    best: BestTrial | None


class SweepRead(SweepSummary):
    """A sweep and every trial, in the order they were queued."""

    trials: list[TrialRead]


class SweepList(StrictModel):
    """A page of sweeps, newest first; pass ``next`` as ``cursor`` for the following page."""

    sweeps: list[SweepSummary]
    next: str | None
