"""What limits a figure: sampled profiles (py-spy for servers, pyinstrument in process).

A profile is summarised as shares of samples: where the time is spent *inside* a function
(self time, the leaf frame) and which named parts of the stack hold it (inclusive time).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Profile:
    """Collapsed stacks (outermost frame first) and how many samples each got."""

    stacks: Counter[tuple[str, ...]]

    @property
    def samples(self) -> int:
        """All samples."""
        return sum(self.stacks.values())

    def self_shares(self, top: int = 8) -> list[tuple[str, float]]:
        """The leaf frames holding most samples, with their share of all samples."""
        leaves: Counter[str] = Counter()
        for stack, n in self.stacks.items():
            leaves[stack[-1] if stack else "(idle)"] += n
        total = self.samples or 1
        return [(short_frame(frame), n / total) for frame, n in leaves.most_common(top)]

    def inclusive_shares(self, parts: Mapping[str, str]) -> dict[str, float]:
        """For each part (a label → a substring of a frame), the share of samples under it.

        A sample counts for the first part (in ``parts``' order) found anywhere on its stack,
        so the shares add up to at most 1; what none matched is ``other``.
        """
        counts: Counter[str] = Counter()
        for stack, n in self.stacks.items():
            label = next(
                (name for name, needle in parts.items() if any(needle in f for f in stack)),
                "other",
            )
            counts[label] += n
        total = self.samples or 1
        return {name: counts[name] / total for name in [*parts, "other"]}


def short_frame(frame: str) -> str:
    """``func (path/to/file.py:12)`` → ``func (file.py)``."""
    m = FRAME.match(frame)
    if m is None:
        return frame
    return f"{m['func']} ({Path(m['file']).name})"


def without_line(frame: str) -> str:
    """``func (path/to/file.py:12)`` → ``func (path/to/file.py)``: one entry per function."""
    m = FRAME.match(frame)
    if m is None:
        return frame
    return f"{m['func']} ({m['file']})"


def parse_collapsed(lines: Iterable[str]) -> Profile:
    """py-spy's ``--format raw`` output: ``frame;frame;... count`` per line."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        stacks[tuple(without_line(f) for f in stack.split(";") if f)] += int(count)
    return Profile(stacks)


def py_spy_path() -> str | None:
    """The py-spy binary beside this interpreter (a dev dependency), or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def py_spy(
    pid: int, seconds: float, out: Path, *, subprocesses: bool = False
) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` (and its children) for ``seconds`` into ``out``.

    Wait for it with :func:`read_py_spy`.
    """
    binary = py_spy_path()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    args = [binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    args += ["--format", "raw", "--output", str(out), "--rate", "250", "--nonblocking"]
    args.append("--full-filenames")
    if subprocesses:
        args.append("--subprocesses")
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_py_spy(proc: subprocess.Popen[bytes], out: Path) -> Profile | None:
    """Wait for a :func:`py_spy` run; its profile, or None when it could not sample."""
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 0 or not out.exists():
        print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
        return None
    with out.open() as fh:
        return parse_collapsed(fh)


def in_process(fn: Callable[[], T], interval_s: float = 0.0005) -> tuple[T, Profile]:
    """Run ``fn`` under pyinstrument; its result and the profile as collapsed stacks."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=interval_s)
    profiler.start()
    try:
        result = fn()
    finally:
        profiler.stop()
    session = profiler.last_session
    assert session is not None
    stacks: Counter[tuple[str, ...]] = Counter()
    for sample in session.frame_records:
        frames, seconds = sample
        stack = tuple(_pyinstrument_frame(f) for f in frames)
        stacks[stack] += max(1, round(seconds / interval_s))
    return result, Profile(stacks)


def _pyinstrument_frame(identifier: str) -> str:
    # pyinstrument identifies frames as "function\x00path\x00line[\x01...]".
    parts = identifier.split("\x01", 1)[0].split("\x00")
    if len(parts) >= 2:
        return f"{parts[0]} ({parts[1]})"
    return identifier


def share_rows(pairs: Iterable[tuple[str, float]]) -> list[list[str]]:
    """Table rows ``[what, share]`` with the share as a percentage."""
    return [[f"`{what}`", f"{share:.0%}"] for what, share in pairs]
