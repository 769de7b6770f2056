"""The command line's entry point as a real process: a Ctrl-C while its commands load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.cli import EXIT_INTERRUPTED
from tests.service.cli.test_pipes import TIMEOUT_S, cli_env

# Imported by the interpreter at start-up (from PYTHONPATH): sends the process a SIGINT as the
# command line's modules begin to import httpx, as a Ctrl-C typed at once would arrive.
INTERRUPT_AT_IMPORT = """\
import importlib.abc, os, signal, sys

class Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "httpx":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupt())
"""


def test_a_ctrl_c_while_the_commands_load_exits_130_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_AT_IMPORT)
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "jobs"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == EXIT_INTERRUPTED, result.stderr
    assert result.stderr == "" and result.stdout == ""
