"""The CLI as a process whose output is cut short (``| head``, a reader that goes away):
it ends quietly, with the exit status a shell gives a command killed by SIGPIPE."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.cli.parser import EXIT_BROKEN_PIPE
from tests.service.cli.conftest import JOB_ID, LONG_JOB_ID
from tests.support import REPO_ROOT

TIMEOUT_S = 60


def cli_env() -> dict[str, str]:
    """As in a terminal: no MNIST_* settings, and output buffered (a flush at exit that
    fails is the case to handle)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MNIST_") and k != "PYTHONUNBUFFERED"
    }
    return {**env, "PYTHONPATH": str(REPO_ROOT)}


def cli(*argv: str, stdout: int, unbuffered: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *argv],
        cwd=REPO_ROOT,
        env={**cli_env(), "PYTHONUNBUFFERED": "1"} if unbuffered else cli_env(),
        stdout=stdout,
        stderr=subprocess.PIPE,
    )


def test_jobs_piped_into_head_ends_quietly(stub_url: str) -> None:
    proc = cli("--url", stub_url, "jobs", stdout=subprocess.PIPE)
    assert proc.stdout is not None
    head = subprocess.run(
        ["head", "-2"], stdin=proc.stdout, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    proc.stdout.close()  # head is the only reader: once it exits, the pipe is closed
    _, err = proc.communicate(timeout=TIMEOUT_S)
    header, first = head.stdout.splitlines()
    assert header.split()[:2] == ["ID", "STATUS"] and first.split()[:2] == [
        f"{0:032x}",
        "succeeded",
    ]
    assert err.decode() == ""
    assert proc.returncode == EXIT_BROKEN_PIPE


def test_a_csv_piped_into_head_ends_with_the_sigpipe_status(stub_url: str) -> None:
    """The CSV (0.75 MB here) was one write: unbuffered (``PYTHONUNBUFFERED=1``, as the
    service's own processes run), CPython took it whole though its reader had left after 64
    KiB, and the command ended 0."""
    argv = ("--url", stub_url, "metrics", LONG_JOB_ID, "--csv")
    proc = cli(*argv, stdout=subprocess.PIPE, unbuffered=True)
    assert proc.stdout is not None
    head = subprocess.run(
        ["head", "-1"], stdin=proc.stdout, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    proc.stdout.close()
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert head.stdout == "step,epoch,examples_seen,loss,test_accuracy\n"
    assert err.decode() == ""
    assert proc.returncode == EXIT_BROKEN_PIPE


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["submit", "--help"], ["jobs"], ["jobs", "--json"], ["metrics", JOB_ID, "--csv"]],
)
def test_a_pipe_closed_before_the_output_ends_the_command_quietly(
    stub_url: str, argv: list[str]
) -> None:
    read, write = os.pipe()
    os.close(read)  # nobody will read: every write fails
    try:
        proc = cli("--url", stub_url, *argv, stdout=write)
    finally:
        os.close(write)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert err.decode() == ""  # no traceback, no "Exception ignored"
    assert proc.returncode == EXIT_BROKEN_PIPE
