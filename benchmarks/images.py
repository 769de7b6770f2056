"""Large images: what one 4000×4000 16-bit PNG upload costs predict, before and after issue #14.

Each pipeline runs in a fresh process of its own (``python -m benchmarks.images <pipeline>``),
so its peak resident set (VmHWM) is its own: "before" is the whole-image pipeline kept in
tests/service/serving/imaging_before.py (float64 for 16-bit images), "now" is
service/serving/imaging.py. A burst of eight at once runs the way each version of the API ran
them: before, as many at once as the thread pool allowed; now, through the decode slots
(``MNIST_MAX_DECODES`` at their largest default).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.report import Section
from tests.support import REPO_ROOT

PIPELINES = ("before", "now")
BURST = 8  # the "8 at once"
MB = 1024 * 1024


def _memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024 / MB
    return fields


def _pipeline(name: str) -> Callable[[bytes], object]:
    if name == "before":
        from tests.service.serving import imaging_before as before

        return lambda data: before.mnist_layout(before.decode(data))
    from service.serving.predictor import images_to_tensor

    return lambda data: images_to_tensor([data])


def _burst(name: str, layout: Callable[[bytes], object], data: bytes) -> None:
    if name == "before":  # the thread pool's 40 threads: all eight at once
        threads = [threading.Thread(target=layout, args=(data,)) for _ in range(BURST)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return
    import anyio

    from service.serving.decode_slots import DecodeSlots
    from service.settings import MAX_DEFAULT_DECODES

    async def main() -> None:
        slots = DecodeSlots(MAX_DEFAULT_DECODES, max_waiting=BURST)
        async with anyio.create_task_group() as tasks:
            for _ in range(BURST):
                tasks.start_soon(slots.run, lambda: layout(data))

    anyio.run(main)


def measure(name: str, runs: int) -> dict[str, float]:
    """In this process: one decode's CPU time and peak, then a burst's peak and what stays."""
    from tests.service.images import big_16_bit_png

    data = big_16_bit_png()
    layout = _pipeline(name)
    start = _memory_mb()
    began = time.process_time()
    layout(data)
    first_cpu_s = time.process_time() - began
    one = _memory_mb()
    cpu_s = []
    for _ in range(runs):
        began = time.process_time()
        layout(data)
        cpu_s.append(time.process_time() - began)
    began_wall = time.monotonic()
    _burst(name, layout, data)
    burst_s = time.monotonic() - began_wall
    burst = _memory_mb()
    return {
        "kb": len(data) / 1024,
        "first_cpu_s": first_cpu_s,
        "cpu_s": statistics.median(cpu_s),
        "one_peak_mb": one["VmHWM"] - start["VmRSS"],
        "burst_peak_mb": burst["VmHWM"] - start["VmRSS"],
        "burst_after_mb": burst["VmRSS"] - start["VmRSS"],
        "burst_s": burst_s,
    }


def run_images(section: Section, runs: int) -> None:
    """Measure both pipelines, each in a fresh process, and write the section."""
    results = {}
    for name in PIPELINES:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.images", name, str(runs)],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        results[name] = json.loads(out.stdout.splitlines()[-1])
    before, now = results["before"], results["now"]
    section.para(
        f"One 4000×4000 16-bit grayscale PNG ({now['kb']:.0f} KB; "
        "tests/service/images.py `big_16_bit_png`) through predict's image pipeline, each "
        "pipeline in a fresh process: CPU time of one decode (median of "
        f"{runs} after the first), and the resident set's growth over the process's size "
        f"before it (VmHWM − VmRSS). The burst is {BURST} at once: before, all together (the "
        "thread pool let 40 run); now, through the decode slots at their largest default "
        "(`MNIST_MAX_DECODES`, the core count up to 8)."
    )
    rows = [
        [
            label,
            f"{r['first_cpu_s']:.2f} s",
            f"{r['cpu_s']:.2f} s",
            f"+{r['one_peak_mb']:.0f} MB",
            f"+{r['burst_peak_mb']:.0f} MB",
            f"+{r['burst_after_mb']:.0f} MB",
            f"{r['burst_s']:.1f} s",
        ]
        for label, r in (("before (float64)", before), ("now (strips, table)", now))
    ]
    section.table(
        [
            "pipeline",
            "CPU, first decode",
            "CPU per decode",
            "peak, one",
            f"peak, {BURST} at once",
            "kept after them",
            f"{BURST} at once took",
        ],
        rows,
    )
    section.para(
        "Forty at once against a real server (tests/service/api/routes/test_predict_memory.py, "
        "8 decode slots) must keep the API under 1.5 GB and `/healthz` answering; the test "
        "prints its figures."
    )


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
