"""``python -m benchmarks`` (``make bench``): measure, then write docs/benchmarks.md.

Options pick sections and shorten runs while developing; the committed document comes from a
plain ``make bench``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.env import REPO_ROOT, gpu_name, load_average, machine_lines
from benchmarks.report import Report, Section

SECTIONS = (
    "training",
    "packing",
    "predict",
    "images",
    "metrics",
    "edge",
    "results",
    "worker-costs",
    "sweeps",
    "artifacts",
    "gpu",
)
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks.md"
# The tutorial's loop (10,000 images × 3 epochs, CPU) as issue #7 measured it on this kind of
# machine when it was quiet: this run's own baseline against it tells how busy the host was.
QUIET_BASELINE_S = 3.4


def host_speed_line(baseline_s: float) -> str:
    """How this run's host compares with a quiet one, read from the tutorial's own loop."""
    slower = baseline_s / QUIET_BASELINE_S
    line = (
        f"- Host speed: the tutorial's loop took {baseline_s:.2f} s in this run, against about "
        f"{QUIET_BASELINE_S} s on a quiet machine of this kind (issue #7)"
    )
    if slower < 1.3:
        return line + "."
    return (
        line + f": this host ran about {slower:.1f}× slower than that (other tenants on the same "
        "cores). Ratios to a baseline of the same run hold; absolute times (latencies, p99, "
        "seconds per series) are that much longer than a quiet machine gives."
    )


def _training(section: Section, root: Path, args: argparse.Namespace) -> str | None:
    from benchmarks.training import run_training

    result = run_training(
        section,
        root,
        runs=args.runs,
        big_runs=args.big_runs,
        cold_runs=args.cold_runs,
        profile=not args.no_profile,
    )
    return host_speed_line(result.baseline_s)


def _packing(section: Section, root: Path, args: argparse.Namespace) -> str | None:
    from benchmarks.packed_worker import run_packing

    run_packing(section, root, rounds=min(args.runs, 3))
    return None


def _predict(section: Section, root: Path, args: argparse.Namespace) -> str | None:
    from benchmarks.predict import run_predict

    run_predict(section, root, runs=args.runs, seconds=args.duration, profile=not args.no_profile)
    return None


def _images(section: Section, _root: Path, args: argparse.Namespace) -> str | None:
    from benchmarks.images import run_images

    run_images(section, runs=args.runs)
    return None


def _metrics(section: Section, root: Path, args: argparse.Namespace) -> str | None:
    from benchmarks.metrics import run_metrics

    run_metrics(section, root, runs=args.runs, profile=not args.no_profile)
    return None


def _edge(section: Section, root: Path, args: argparse.Namespace) -> str | None:
    from benchmarks.edge import run_edge

    run_edge(section, root, runs=args.runs, seconds=args.duration)
    return None


def _results(section: Section, root: Path, args: argparse.Namespace) -> str | None:
    from benchmarks.results import run_results

    run_results(section, root, rounds=args.runs)
    return None


def _worker_costs(section: Section, root: Path, args: argparse.Namespace) -> str | None:
    from benchmarks.worker_costs import run_worker_costs

    # Three times the runs, made even (as many rounds in each order): a part's few
    # milliseconds need more pairs than a figure's median.
    rounds = 3 * args.runs
    run_worker_costs(section, root, rounds=rounds + rounds % 2)
    return None


def _sweeps(section: Section, root: Path, args: argparse.Namespace) -> str | None:
    from benchmarks.sweeps import run_sweeps

    run_sweeps(section, root, rounds=max(1, args.runs // 2))
    return None


def _artifacts(section: Section, root: Path, args: argparse.Namespace) -> str | None:
    from benchmarks.artifacts import run_artifacts

    run_artifacts(section, root, runs=args.runs)
    return None


def _gpu(section: Section, _root: Path, _args: argparse.Namespace) -> str | None:
    from benchmarks.gpu import card_summary

    gpu = gpu_name()
    if gpu is not None:
        section.para(
            f"A GPU is here ({gpu}): `make bench-gpu` (`python -m benchmarks.gpu`) writes its "
            "figures to docs/benchmarks-gpu.md."
        )
        return None
    quoted = card_summary()
    if quoted is None:
        section.para("No GPU on this machine, and no figures measured on a card yet.")
    else:
        written, card, *summary = quoted
        section.para(
            "No GPU on this machine. docs/benchmarks-gpu.md holds the figures measured on a "
            f"lent card ({card.removeprefix('- GPU: ')}) by `bash benchmarks/gpu_device.sh "
            f"run`, {written[0].lower()}{written[1:]} Its summary:"
        )
        section.lines += [*summary, ""]
    section.para(
        "The same code trains on `cuda` (MNIST_DEVICE=cuda or auto) with no per-step host "
        "synchronisation: the loop keeps each loss on the device and the reporter copies them "
        "to the host once per flush (tests/workers/test_host_sync.py counts the host copies of "
        "a real job: at most one per flush and one per epoch). There every full batch replays "
        "the step from a CUDA graph captured once per job (MNIST_CUDA_GRAPHS, "
        "workers/training/graphs.py): one launch instead of ~25 kernels launched from Python. "
        "Without a card this is checked against the eager loop, bit for bit, through a stand-in "
        "that keeps a graph's contract (tests/workers/training/test_graphs.py); the tests that "
        "compare real "
        "graphs with eager training on a card run on the lent machine. On a machine with a "
        "CUDA card, `make bench-gpu` (`python -m benchmarks.gpu`) runs the baseline, the floor "
        "and the worker (with and without the graph) on the card in one short run, counts "
        "synchronisations with torch.cuda.set_sync_debug_mode by the line that made them, "
        "checks the goals (≥ 30× the baseline, 60,000 images × 3 epochs under 1 s) and "
        "writes docs/benchmarks-gpu.md."
    )
    return None


# Writes its section; may return a line for the document's preamble.
Runner = Callable[[Section, Path, argparse.Namespace], str | None]
RUNNERS: dict[str, tuple[str, Runner]] = {
    "training": ("Training (CPU)", _training),
    "packing": ("Packed training", _packing),
    "predict": ("Predict under load", _predict),
    "images": ("Large images", _images),
    "metrics": ("Metrics polling", _metrics),
    "edge": ("The HTTP edge", _edge),
    "results": ("Time to result", _results),
    "worker-costs": ("Where the worker's time goes", _worker_costs),
    "sweeps": ("Sweeps", _sweeps),
    "artifacts": ("Artifacts", _artifacts),
    "gpu": ("GPU", _gpu),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--only", choices=SECTIONS, action="append", help="run only these sections (repeatable)"
    )
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (median of them)")
    parser.add_argument(
        "--big-runs", type=int, default=3, help="runs of the 60,000-image figures (0: skip)"
    )
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh-worker runs")
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds of load per predict measurement"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the profiles")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections and write the report."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sections = args.only or list(SECTIONS)
    command = (
        "`make bench` (`python -m benchmarks`)"
        if argv is None and len(sys.argv) == 1
        else "`"
        + shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])
        + "`"
    )
    report = Report("Benchmarks")
    started = time.monotonic()
    load_before = load_average()
    report.preamble += [
        f"Written by {command} on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Every figure is "
        "the median of several runs, each compared with its baseline measured in the same "
        "run on the same machine; compare figures only within one document.",
        "",
        *machine_lines(),
    ]
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        for name in SECTIONS:
            if name in sections:
                title, run = RUNNERS[name]
                print(f"{name} …", file=sys.stderr, flush=True)
                line = run(report.section(title), Path(tmp) / name, args)
                if line is not None:
                    notes.append(line)
    elapsed = time.monotonic() - started
    report.preamble += [
        f"- Load average (1, 5, 15 min) before: {load_before}; after: {load_average()} "
        f"(other processes shared these cores); the whole run took {elapsed:.0f} s.",
        *notes,
        "",
    ]
    report.write(args.output)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
