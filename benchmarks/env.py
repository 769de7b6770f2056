"""The machine a benchmark runs on, and scratch databases migrated the service's own way."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from service.settings import Settings
from tests.support import service_env

REPO_ROOT = Path(__file__).resolve().parent.parent
# The checkout's sibling shared/ folder, where CI and the developers keep the official files.
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "datasets"
# Cores for the clients that stand for users (the pollers, the stream followers), e.g. "2,3":
# on a machine with cores to spare, run the benchmark under `taskset` on others, and the
# clients cost the job's cores what a client on another machine would, nothing.
CLIENT_CPUS_ENV = "MNIST_BENCH_CLIENT_CPUS"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform says elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    """Physical memory in GiB (0 when unknown)."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0.0
    return pages * page_size / 2**30


def load_average() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def gpu_name() -> str | None:
    """The first CUDA device's name, or None without one."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def client_cpus() -> frozenset[int] | None:
    """The cores named by ``MNIST_BENCH_CLIENT_CPUS``, or None where the clients share the
    job's cores (the default). Fails fast when they are not cores of this machine or overlap the
    cores this run may use: clients on the job's cores would measure the other case."""
    raw = os.environ.get(CLIENT_CPUS_ENV, "").strip()
    if not raw:
        return None
    try:
        cpus = frozenset(int(c) for c in raw.split(","))
    except ValueError:
        raise SystemExit(f'{CLIENT_CPUS_ENV}={raw!r}: give core numbers, e.g. "2,3"') from None
    ours = os.sched_getaffinity(0)
    if not cpus <= set(range(os.cpu_count() or 1)) or cpus & ours:
        raise SystemExit(
            f"{CLIENT_CPUS_ENV}={raw}: name cores of this machine outside this run's own "
            f"({_cores(ours)}); run the benchmark under taskset on the others"
        )
    return cpus


def client_command(args: list[str]) -> list[str]:
    """``args`` to start a client with: under util-linux's ``taskset`` on the client cores
    where there are some (set before the client runs, so every thread it starts stays there;
    a C program, whose start costs the client's CPU clock next to nothing), else as they are."""
    cpus = client_cpus()
    if cpus is None:
        return args
    taskset = shutil.which("taskset")
    if taskset is None:
        raise SystemExit(f"{CLIENT_CPUS_ENV} needs taskset (util-linux)")
    return [taskset, "-c", _core_list(cpus), *args]


def clients_where() -> str:
    """Where the clients run, for the reports' prose."""
    cpus = client_cpus()
    if cpus is None:
        return "on the job's cores"
    return f"on {_cores(cpus)}, apart from the job's ({CLIENT_CPUS_ENV})"


def _core_list(cpus: set[int] | frozenset[int]) -> str:
    """Cores as taskset and MNIST_BENCH_CLIENT_CPUS write them: "2,3"."""
    return ",".join(str(c) for c in sorted(cpus))


def _cores(cpus: set[int] | frozenset[int]) -> str:
    return ("cores " if len(cpus) > 1 else "core ") + _core_list(cpus)


def machine_lines() -> list[str]:
    """A description of this machine for the report's preamble."""
    gpu = gpu_name()
    lines = [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; memory {memory_gib():.0f} GiB",
        f"- GPU: {gpu or 'none on this machine'}",
        f"- {platform.platform()}; Python {platform.python_version()}; torch {torch.__version__} "
        f"(default intra-op threads {torch.get_num_threads()})",
    ]
    ours = os.sched_getaffinity(0)
    if len(ours) < (os.cpu_count() or 1) or client_cpus() is not None:
        lines.append(
            f"- Cores: this run's processes on {_cores(ours)}; the clients that stand for "
            f"users {clients_where()}."
        )
    return lines


def data_dir() -> Path:
    """Where the official MNIST files are: MNIST_DATA_DIR, else the shared copy."""
    root = Path(os.environ.get("MNIST_DATA_DIR", DEFAULT_DATA_DIR))
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        raise SystemExit(
            f"benchmarks need the official MNIST files: set MNIST_DATA_DIR to the folder holding "
            f"MNIST/raw (looked in {root})"
        )
    return root.resolve()


@dataclass(frozen=True)
class Workspace:
    """A folder with a migrated SQLite database and a checkpoints folder."""

    root: Path

    @property
    def database_url(self) -> str:
        """The SQLite URL of this workspace's database."""
        return f"sqlite:///{self.root / 'mnist.db'}"

    @property
    def checkpoint_dir(self) -> Path:
        """Where this workspace's workers write weights."""
        return self.root / "models"

    def settings(self, **overrides: object) -> Settings:
        """The service's settings on this workspace (CPU, no download), with ``overrides``."""
        values: dict[str, object] = {
            "database_url": self.database_url,
            "data_dir": data_dir(),
            "download": False,
            "checkpoint_dir": self.checkpoint_dir,
            "device": "cpu",
        }
        values.update(overrides)
        return Settings.model_validate(values)

    def env(self, **settings: str) -> dict[str, str]:
        """The environment of a service process on this workspace: on the CPU, as
        :meth:`settings` (a worker left at ``auto`` would train on a card where there is one,
        under sections that measure the CPU)."""
        return service_env(
            **{
                "database_url": self.database_url,
                "data_dir": str(data_dir()),
                "checkpoint_dir": str(self.checkpoint_dir),
                "device": "cpu",
                **settings,
            }
        )


def make_workspace(root: Path) -> Workspace:
    """Create ``root`` and migrate its database with the service's own command."""
    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root)
    subprocess.run(
        [sys.executable, "-m", "service.cli", "migrate"],
        cwd=REPO_ROOT,
        env=ws.env(),
        check=True,
        capture_output=True,
    )
    return ws
