"""A job's live event stream: ``status``, ``step`` (batched) and ``epoch`` events from the database.

The stream is a loop of short polls, each in a reading transaction of its own (a long-lived one
would pin one snapshot and never see news), wherever the caller's :class:`StreamReads` reads.
Between polls it waits for the job's wake-up (:mod:`service.store.wakeups`, published with
every flush and status change), or for ``events_poll_s`` when none comes.

Every event carries an id ``attempt:step:epoch:sent``: the last step and epoch the client has
been sent, and how many events it has been sent on this stream, reconnections included, so
that no two ids are alike (a reconnection's opening ``status`` is at the same step as the id it
resumed from, and the final ``status`` at the same step as the last ``epoch``). The final
event's id ends in ``:end``. A client that reconnects with an id as ``Last-Event-ID`` is sent
only what comes after; with the final one, the stream has nothing left and answers 204, the
standard's way to stop a browser's ``EventSource`` from reconnecting. A new attempt (a
retried job starts over) resets the position, and the ``status`` event that announces it
comes before its steps. The last event is a ``status`` with ``"final": true``, after every
step and epoch.

Events are FastAPI's :class:`ServerSentEvent` (the route writes them out, with the
reconnection delay on the first), and a keep-alive whenever the stream has been silent for
:data:`KEEPALIVE_S` (a comment line, not an event). Every event carries data. The payload is
our JSON (``raw_data``): compact, one line, never NaN; FastAPI's own ``data=`` encoding goes through
``jsonable_encoder``, many times slower on a batch of a thousand steps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import orjson
from fastapi.sse import ServerSentEvent

from service.domain.event_reads import (
    News,
    Position,
    SharedReads,
    StreamReads,
    read_news,
)
from service.domain.jobs import to_read
from service.errors import DatabaseUnavailable, InvalidInput, NotFound
from service.status import TERMINAL
from service.steps import StepPlan
from service.store import job_repo, wakeups
from service.store.availability import unavailable_as_503
from service.store.engines import Reader
from service.store.tables import MAX_INTEGER

STEPS_PER_POLL = 1000  # at most this many steps are read (and sent) per poll
OUTAGE_WAIT_MAX_S = 5.0  # the longest wait between polls while the database is unavailable
# A silent stream says this at least this often, so that proxies and clients that time out an
# idle connection keep it: a comment, which no client takes for an event.
KEEPALIVE_S = 15.0
KEEPALIVE = ServerSentEvent(comment="ping")
# Line breaks to ``str.splitlines`` that JSON may carry raw (orjson escapes those below U+0020),
# in UTF-8, where each of these byte runs is only ever that character.
_LINE_BREAKS = tuple((c.encode(), f"\\u{ord(c):04x}".encode()) for c in "\x85\u2028\u2029")
T = TypeVar("T")


FINAL_MARK = "end"
# The event ids a stream sends, as the route admits them (an empty one means "from the
# start"): ``attempt:step:epoch:sent``, ``:end`` after the final event's. Nine digits each: more
# than any stream sends, and every id the pattern admits fits the columns (2**31 - 1), so none
# is refused after validation. ``attempt:step:epoch`` alone is an id sent before the count was.
_NUMBER = "[0-9]{1,9}"
SENT_WRAP = 10**9  # the count of events sent goes on from 0 past nine digits (a client's id)
EVENT_ID_PATTERN = f"^({_NUMBER}:{_NUMBER}:{_NUMBER}(:{_NUMBER}(:{FINAL_MARK})?)?)?$"


@dataclass(frozen=True)
class Cursor:
    """What a client has been sent: an attempt, its steps and epochs up to these numbers, how
    many events in all, and whether the last was the final one."""

    attempt: int = 0
    step: int = 0
    epoch: int = 0
    sent: int = 0  # counts on across reconnections: it tells every event's id apart
    final: bool = False

    def encode(self) -> str:
        """The event id: ``attempt:step:epoch:sent``, and ``:end`` on the final event."""
        numbers = f"{self.attempt}:{self.step}:{self.epoch}:{self.sent}"
        return f"{numbers}:{FINAL_MARK}" if self.final else numbers

    @classmethod
    def parse(
        cls, raw: str | None, *, loc: tuple[str, str] = ("header", "last-event-id")
    ) -> Cursor:
        """A cursor from a ``Last-Event-ID`` (or what ``loc`` names); None or empty means from
        the start. 422 for anything this stream cannot have sent, numbers beyond the columns'
        range included: they would fail the stream's queries once it is open (a browser would
        then reconnect with the same id, again and again)."""
        if not raw:
            return cls()
        parts = raw.strip().split(":")
        final = len(parts) == 5 and parts[4] == FINAL_MARK
        numbers = parts[:4] if final else parts
        if len(numbers) not in (3, 4) or not all(
            n.isascii() and n.isdigit() and int(n) <= MAX_INTEGER for n in numbers
        ):
            name = "Last-Event-ID" if loc[0] == "header" else loc[1]
            raise InvalidInput(
                f"{name} {raw!r} is not an id this stream sent (attempt:step:epoch:sent, "
                f"numbers from 0 to {MAX_INTEGER}, and :{FINAL_MARK} after the final event's)",
                details=[{"loc": list(loc), "msg": "invalid event id"}],
            )
        attempt, step, epoch, *sent = (int(n) for n in numbers)
        return cls(attempt, step, epoch, sent[0] if sent else 0, final=final)


def is_final(event: ServerSentEvent) -> bool:
    """Whether ``event`` is a stream's final one: nothing follows it. Its id says so, read by
    :meth:`Cursor.parse`, the one reader of the ids' format."""
    return event.id is not None and Cursor.parse(event.id).final


@dataclass
class Poll:
    """What one poll found: events to send, and whether the stream is over."""

    events: list[ServerSentEvent] = field(default_factory=list)
    done: bool = False
    more: bool = False  # the step limit was hit: poll again at once


@dataclass
class StreamState:
    """A stream's position between polls."""

    cursor: Cursor
    job_id: str
    status: str | None = None  # the last status sent (None: nothing sent yet)
    read: int = 0  # the order of the last shared read it used; 0: none yet (:class:`SharedReads`)
    opened: SimpleNamespace | None = None  # the job as it opened (:func:`opening_row`)

    def emit(self, poll: Poll, event: str, data: Any, *, final: bool = False) -> None:
        """Append an event; its id is the cursor, which counts it."""
        sent = (self.cursor.sent + 1) % SENT_WRAP  # never an id the route refuses
        self.cursor = replace(self.cursor, sent=sent, final=final)
        poll.events.append(
            ServerSentEvent(event=event, raw_data=json_data(data), id=self.cursor.encode())
        )


def json_data(data: Any) -> str:
    """An event's payload: compact JSON has no newline (one ``data`` line), and a NaN (never
    stored: the worker refuses a non-finite loss) is an error, not a silent ``null``.

    Written by orjson, as the metrics page is: every open stream of a job encodes each of its
    batches, and the standard library's encoder took a quarter of the API's CPU with 200
    streams open (docs/benchmarks.md). orjson writes a non-finite float as ``null``, so a
    payload that holds one is written again by the standard library, which refuses it. And it
    leaves non-ASCII text as it is, where the standard library escaped it: the characters that
    some readers end a line at (Python's ``str.splitlines``, httpx's ``iter_lines``) are
    escaped here, so that a payload stays one line for every reader."""
    encoded = orjson.dumps(data)
    if b"null" in encoded:  # a None, or a non-finite float: only the second is refused
        json.dumps(data, allow_nan=False)
    for raw, escaped in _LINE_BREAKS:
        if raw in encoded:
            encoded = encoded.replace(raw, escaped)
    return encoded.decode()


async def opening_row(reads: StreamReads, job_id: str) -> SimpleNamespace:
    """The job's row as a stream opens, read where the stream's polls read (on SQLite on the
    event loop: a thread hand-off and an ORM session cost each stream more than its polls did,
    docs/benchmarks.md); :class:`NotFound` unless the job exists. The route answers 204 from it
    (:func:`has_ended`), and the stream's first poll takes another stream's read only if that
    read saw the job as this one did (:class:`SharedReads`)."""
    with unavailable_as_503("an event stream"):
        job = await reads.read(lambda db: job_repo.job_row(db, job_id))
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    return job


def has_ended(job: SimpleNamespace, cursor: Cursor) -> bool:
    """Whether a stream resumed at ``cursor`` has nothing left to send: its job has ended and
    the cursor is the final event's (the route answers 204)."""
    return bool(cursor.final and job.status in TERMINAL and job.attempt == cursor.attempt)


def position(cursor: Cursor, max_steps: int | None = None) -> Position:
    """Where a stream at ``cursor`` reads from, ``max_steps`` steps at most
    (:data:`STEPS_PER_POLL` unless given)."""
    return Position(cursor.attempt, cursor.epoch, cursor.step, max_steps or STEPS_PER_POLL)


def poll(db: Reader, state: StreamState, *, max_steps: int | None = None) -> Poll:
    """Read what is new for the stream (:func:`~service.domain.event_reads.read_news`, at most
    ``max_steps`` steps, :data:`STEPS_PER_POLL` unless given) and advance its state."""
    at = position(state.cursor, max_steps)
    return advance(read_news(db, state.job_id, at), state, at.limit)


def advance(news: News, state: StreamState, limit: int) -> Poll:
    """The events a read of ``limit`` steps at most holds for the stream, its state advanced."""
    out = Poll()
    job = news.job
    if job is None:  # deleted under the stream
        out.done = True
        return out
    per_epoch = StepPlan.of(job).steps_per_epoch

    def send_status(*, final: bool) -> None:
        # Built only when sent: most polls find only steps, and the job's whole read model
        # cost a poll more than its reads did (docs/benchmarks.md).
        state.status = job.status
        data = to_read(job).model_dump(mode="json")
        state.emit(
            out, "status", {**data, "steps_per_epoch": per_epoch, "final": final}, final=final
        )

    new_attempt = job.attempt != state.cursor.attempt
    if new_attempt:
        state.cursor = Cursor(attempt=job.attempt, sent=state.cursor.sent)
    if new_attempt or state.status is None:
        send_status(final=False)

    epochs, steps = list(news.epochs), news.steps
    out.more = len(steps) == limit
    finished = job.status in TERMINAL and not out.more

    def send_due_epochs(sent_step: int, *, all_left: bool = False) -> None:
        # An epoch's accuracy goes out after its last step, so clients see them in order.
        while epochs and (all_left or sent_step >= epochs[0]["epoch"] * per_epoch):
            row = epochs.pop(0)
            state.cursor = replace(state.cursor, epoch=row["epoch"])
            state.emit(out, "epoch", row)

    batch: list[dict[str, Any]] = []
    for row in steps:
        batch.append(row)
        if epochs and row["step"] >= epochs[0]["epoch"] * per_epoch:
            state.cursor = replace(state.cursor, step=row["step"])
            state.emit(out, "step", {"steps": batch})
            batch = []
            send_due_epochs(row["step"])
    if batch:
        state.cursor = replace(state.cursor, step=batch[-1]["step"])
        state.emit(out, "step", {"steps": batch})
    # Once the job has ended and every step is out, whatever epochs are left go too.
    send_due_epochs(state.cursor.step, all_left=finished)

    # A terminal status goes out once, last, flagged final: clients close on it (a browser's
    # EventSource would otherwise reconnect to a stream that has ended).
    changed = job.status != state.status and job.status not in TERMINAL
    if changed or finished:
        send_status(final=finished)
    out.done = finished
    return out


async def _poll_once(
    reads: StreamReads,
    state: StreamState,
    *,
    shared: SharedReads | None,
    generation: Callable[[], int | None],
    woke: bool,
) -> Poll:
    """One poll. Reads in a thread do the whole poll there (a thousand steps' events built on
    the loop would hold it up) and share nothing; reads on the loop may take another stream's
    read from ``shared``, and the events built from it for a stream that stood alike, when woken
    or at a stream's first poll (:class:`SharedReads` says when that is safe), and keep their
    own there. The events are then shared by the streams: never changed."""
    # On a copy: a poll that fails half way (the database went away) leaves the state as it
    # was, so the next poll sends again whatever this one had prepared.
    trial = replace(state)
    at = position(trial.cursor, min(STEPS_PER_POLL, reads.loop_steps or STEPS_PER_POLL))
    with unavailable_as_503("an event stream"):
        if shared is None or reads.loop_steps is None:
            result = await reads.read(
                lambda db: advance(read_news(db, state.job_id, at), trial, at.limit)
            )
        else:
            seen = generation()  # before the read, which holds what was announced by now
            first = state.read == 0 and state.opened is not None
            like = None if woke else state.opened  # a first poll: the job as the stream opened
            kept = None
            if woke or first:
                kept = shared.get(state.job_id, at, seen, after=state.read, like=like)
            if kept is None:
                news = await reads.read(lambda db: read_news(db, state.job_id, at))
                kept = shared.keep(state.job_id, at, seen, news)
            trial.read, news = kept.order, kept.news

            def build() -> tuple[Poll, Cursor, str | None]:
                return advance(news, trial, at.limit), trial.cursor, trial.status

            result, trial.cursor, trial.status = kept.once((trial.cursor, trial.status), build)
    state.cursor, state.status, state.read = trial.cursor, trial.status, trial.read
    return result


async def batches(
    reads: StreamReads,
    job_id: str,
    cursor: Cursor,
    *,
    poll_s: float,
    wake: wakeups.Listener | None = None,
    shared: SharedReads | None = None,
    opened: SimpleNamespace | None = None,
) -> AsyncIterator[list[ServerSentEvent]]:
    """The events of one job, a poll's at a time (the route writes each batch at once: one
    write, and one wake-up of the client, rather than one per event), until the job has ended
    and everything has been sent; and :data:`KEEPALIVE` whenever the stream has been silent for
    :data:`KEEPALIVE_S`.

    Each poll reads through ``reads``: in a worker thread, or on the event loop a few hundred
    steps at most (``reads.loop_steps``), so an open stream never holds up the loop; between
    polls it waits for the job's wake-up from ``wake``, at most ``poll_s``
    (a lost wake-up costs that much latency; without ``wake``, every wait is ``poll_s``), and
    may take another stream's read and events from ``shared`` (:class:`SharedReads`); its first
    poll only given ``opened``, the job's row as the stream opened (:func:`opening_row`).

    While the database is unavailable the stream stays open and polls less often (up to
    :data:`OUTAGE_WAIT_MAX_S` apart; the keep-alives go on), then carries on from where it
    was. Ending it instead would not help: a browser's ``EventSource`` that reconnects and
    meets the 503 gives up for good.
    """
    state = StreamState(cursor=cursor, job_id=job_id, opened=opened)
    outage_wait_s = poll_s
    said = anyio.current_time()  # when the client last heard from the stream
    # Subscribed before the first poll: news committed after a poll's read wakes the wait
    # that follows it.
    listener = wake or wakeups.Listener()
    shared = shared if wake is not None else None  # its generations are that listener's
    woke = False  # whether the wait before this poll ended with a wake-up

    def generation() -> int | None:
        return listener.generation(wakeups.JOB_PROGRESS, job_id)

    with listener.subscribe_async(wakeups.JOB_PROGRESS, job_id) as news:
        while True:
            try:
                result: Poll | None = await _poll_once(
                    reads, state, shared=shared, generation=generation, woke=woke
                )
            except DatabaseUnavailable:
                result = None
                outage_wait_s = min(outage_wait_s * 2, max(poll_s, OUTAGE_WAIT_MAX_S))
            if result is not None:
                outage_wait_s = poll_s
                if result.events:
                    yield result.events  # perhaps other streams' too: never changed
                    said = anyio.current_time()
                if result.done:
                    return
                if result.more:
                    # The next poll at once, but after the loop has run whatever waits:
                    # a stream catching up reads on and on.
                    await anyio.lowlevel.checkpoint()
                    woke = False
                    continue
            if anyio.current_time() - said >= KEEPALIVE_S:
                yield [KEEPALIVE]
                said = anyio.current_time()
            until_keepalive_s = said + KEEPALIVE_S - anyio.current_time()
            woke = False
            if result is None:
                await anyio.sleep(min(outage_wait_s, until_keepalive_s))
            else:
                woke = await news.wait(min(poll_s, until_keepalive_s))
