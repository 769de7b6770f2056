"""Run several processes as one: a child that dies is started again; our signals stop them all.

A small loop of our own rather than supervisord or circus: those are daemons with their own
configuration, for what here is a short list of commands and one backoff rule.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Mapping
from contextlib import suppress
from dataclasses import dataclass

from service.backoff import capped_exponential
from workers.signals import on_signals

log = logging.getLogger("workers.supervisor")

# After our first signal, how long the children may take to stop beyond a worker's grace
# (MNIST_SHUTDOWN_GRACE_S, to end its epoch): its job's release, the API's close, the exits.
SHUTDOWN_MARGIN_S = 30.0
POLL_S = 0.2  # while stopping: how often the children still running are looked at
CRASH_LOOP_STATUS = 1  # what the supervisor returns when a child cannot start
CLEAN = (0, -signal.SIGINT, -signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # prctl(2)
SUPERVISOR_ENV = "_MNIST_SUPERVISOR_PID"  # a child's supervisor, told by it (not a setting)


@dataclass(frozen=True)
class Backoff:
    """When a dead child is started again, and when starting it again is pointless.

    The first restart waits ``first_s``, each further exit in a row doubles the wait, up to
    ``max_s``; a run of ``stable_s`` or longer starts the count afresh. A child that has exited
    ``give_up_after`` times in a row and never once stayed up ``stable_s`` cannot start (a
    configuration error, its port taken): restarting it would only fill the log, so the
    supervisor stops everything and exits nonzero. Once a child has stayed up, it is restarted
    for as long as it takes (an outage may last).
    """

    first_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 30.0
    give_up_after: int = 5

    def delay(self, exits_in_a_row: int) -> float:
        """The wait before the restart that follows the ``exits_in_a_row``-th exit."""
        return capped_exponential(self.first_s, self.max_s, exits_in_a_row - 1)


DEFAULT_BACKOFF = Backoff()


def describe(status: int) -> str:
    """A child's exit as words: its status, or the signal that killed it."""
    if status >= 0:
        return f"exited with status {status}"
    try:
        return f"was killed by {signal.Signals(-status).name}"
    except ValueError:  # a real-time signal has no name
        return f"was killed by signal {-status}"


class Child:
    """One supervised command: its current process and its record of exits."""

    def __init__(self, name: str, args: list[str], exited: threading.Event) -> None:
        self.name, self.args = name, args
        self.exited = exited  # set when any child's process exits
        self.exits_in_a_row = self.restarts = 0
        self.ever_stable = False
        self.restart_at: float | None = None
        self.proc = self.start()

    def start(self) -> subprocess.Popen[bytes]:
        """``python <args>`` in a process group of its own: a terminal's Ctrl-C reaches the
        supervisor alone, which passes it on once (a second signal makes a child exit at once).
        A thread waits for its exit (without reaping it: :meth:`tend` does) and sets
        :attr:`exited`, so the supervisor sleeps until then rather than looking every 0.2 s."""
        self.proc = subprocess.Popen(
            [sys.executable, *self.args],
            process_group=0,
            env={**os.environ, SUPERVISOR_ENV: str(os.getpid())},  # see follow_supervisor
        )
        self.started = time.monotonic()
        self.restart_at = None
        log.info("%s started (pid %d)", self.name, self.proc.pid)
        pid = self.proc.pid

        def watch() -> None:
            with suppress(ChildProcessError):  # reaped already (the supervisor is stopping)
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            self.exited.set()

        threading.Thread(target=watch, name=f"watch-{self.name}", daemon=True).start()
        return self.proc

    def wait_s(self, now: float) -> float | None:
        """How long until this child is due to start again (None: it runs)."""
        return None if self.restart_at is None else max(0.0, self.restart_at - now)

    def tend(self, backoff: Backoff, refused: Collection[int]) -> int | None:
        """Start the child again when its wait is over; notice when it exits.

        Returns the status the supervisor should give up with, or None to carry on.
        """
        now = time.monotonic()
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.start()
            return None
        if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return None
        # What it started (uvicorn's worker processes, say) goes with it, so that a new API finds
        # its port free; killed before it is reaped, while its group's id cannot be reused.
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        status = self.proc.wait()  # reaped: a new worker sees its pid gone (Worker.register)
        up_s = now - self.started
        if up_s >= backoff.stable_s:
            self.ever_stable, self.exits_in_a_row = True, 0
        self.exits_in_a_row += 1
        exited = f"{self.name} (pid {self.proc.pid}) {describe(status)} after {up_s:.1f} s"
        if status in refused:
            log.error("%s: it refused its configuration (see above); stopping everything", exited)
            return status
        if not self.ever_stable and self.exits_in_a_row >= backoff.give_up_after:
            log.error(
                "%s, %d times in a row without staying up %.0f s: it cannot start; "
                "stopping everything",
                exited,
                self.exits_in_a_row,
                backoff.stable_s,
            )
            return CRASH_LOOP_STATUS
        self.restarts += 1
        delay = backoff.delay(self.exits_in_a_row)
        self.restart_at = now + delay
        log.warning("%s; restart %d in %.1f s", exited, self.restarts, delay)
        return None


def supervise(
    commands: Mapping[str, list[str]],
    *,
    backoff: Backoff = DEFAULT_BACKOFF,
    refused: Collection[int] = (),
    grace_s: float,
) -> int:
    """Run ``python <args>`` for each named command, restarting any that dies, until signalled.

    A child's exit never stops the others, whatever its status (0 included): it is started
    again after :class:`Backoff`'s wait. Exit statuses in ``refused`` mean the child refuses
    its configuration, and a child that keeps failing at start cannot start: either stops
    everything, and that status (or 1) is returned. The first SIGINT/SIGTERM is passed on to
    every child, which stops gracefully within ``grace_s`` (a worker's MNIST_SHUTDOWN_GRACE_S)
    and :data:`SHUTDOWN_MARGIN_S`: a fixed 60 s cut a longer grace short, the job left running
    under a lease; a second signal kills them.
    Returns 0 when every child stopped cleanly on our signal, else 1.
    """
    signals: list[int] = []
    stop, kill = threading.Event(), threading.Event()
    news = threading.Event()  # a signal came or a child exited: the loop looks

    def first(signum: int) -> None:
        signals.append(signum)
        stop.set()
        news.set()

    def again(_signum: int) -> None:
        kill.set()

    on_signals(first, again)
    children: list[Child] = []
    gave_up: int | None = None
    try:
        for name, args in commands.items():
            children.append(Child(name, args, news))
        while gave_up is None and not stop.is_set():
            # Until news, or the next restart is due; cleared before the look, so that an exit
            # after it sets it again and is looked at next time round.
            now = time.monotonic()
            waits = [w for w in (c.wait_s(now) for c in children) if w is not None]
            news.wait(min(waits, default=None))
            news.clear()
            if stop.is_set():
                break
            for child in children:
                gave_up = child.tend(backoff, refused)
                if gave_up is not None:
                    break
    except OSError as exc:  # a process could not be started (its interpreter gone, no memory)
        log.error("a process could not be started (%s); stopping everything", exc)
        gave_up = CRASH_LOOP_STATUS
    finally:  # whatever ends the loop, no child outlives it (the API would hold its port)
        running = {c.name: c.proc for c in children if c.proc.poll() is None}
        # A hangup is passed on as SIGTERM: the children's graceful stop (uvicorn would read
        # SIGHUP as a reload, and a plain process dies of it).
        signum = signals[0] if signals and signals[0] != signal.SIGHUP else signal.SIGTERM
        clean = stop_all(running, signum, kill, wait_s=grace_s + SHUTDOWN_MARGIN_S)
    if gave_up is not None:
        return gave_up
    return 0 if clean else 1


def follow_supervisor() -> None:
    """In a supervised child (the API, a worker), as it starts: SIGTERM, its graceful stop,
    when its supervisor dies, however it dies (SIGKILL, the OOM killer). The children lived on
    without it, the API holding its port, and the next ``run`` could not start. Asked of the
    kernel by the child itself (a ``preexec_fn`` would run Python between fork and exec, which
    a threaded supervisor may deadlock). Linux only; a supervisor gone already ends it now."""
    parent = os.environ.pop(SUPERVISOR_ENV, None)
    if parent is None or sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


def stop_all(
    procs: Mapping[str, subprocess.Popen[bytes]],
    signum: int,
    kill: threading.Event,
    *,
    wait_s: float,
) -> bool:
    """Pass ``signum`` to each named process and wait for them all; kill what is left when
    ``kill`` is set or after ``wait_s``, saying so. Returns whether every one stopped cleanly."""
    for p in procs.values():
        p.send_signal(signum)
    deadline = time.monotonic() + wait_s
    while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
        kill.wait(POLL_S)
        if kill.is_set():
            break
    for name, p in procs.items():
        if p.poll() is None:
            why = "a second signal" if kill.is_set() else f"{wait_s:g} s"
            log.warning("%s had not stopped after %s; killed", name, why)
            p.kill()
            p.wait()
    return all(p.returncode in CLEAN for p in procs.values())
