"""Watching a job from a terminal: the tutorial's tqdm bar per epoch, fed by its events."""

from __future__ import annotations

from typing import Any, TextIO

from tqdm import tqdm

from service.cli.client import Client


class EpochBars:
    """The tutorial's tqdm bar per epoch, fed by a job's events; loss and accuracy as postfix."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.bar: tqdm[Any] | None = None
        self.job: dict[str, Any] = {}
        self.loss: float | None = None
        self.accuracy: float | None = None
        self.epoch_done = 0  # epochs finished, so the open bar is epoch_done + 1
        self.bar_steps = 0  # steps counted on the open bar

    def _open(self) -> tqdm[Any]:
        if self.bar is None:
            epochs = self.job["params"]["epochs"]
            self.bar = tqdm(
                total=self.job["steps_per_epoch"],
                desc=f"epoch {self.epoch_done + 1}/{epochs}",
                unit="step",
                file=self.out,
                dynamic_ncols=True,
                leave=True,
            )
            self.bar_steps = 0
        return self.bar

    def _postfix(self, bar: tqdm[Any]) -> None:
        postfix = {"loss": f"{self.loss:.4f}" if self.loss is not None else "-"}
        if self.accuracy is not None:
            postfix["acc"] = f"{self.accuracy:.4f}"
        bar.set_postfix(postfix, refresh=True)

    def status(self, job: dict[str, Any]) -> None:
        """A status event: a new attempt starts the bars over."""
        if self.job and job["attempt"] != self.job["attempt"]:
            self.close()
            self.epoch_done, self.loss, self.accuracy = 0, None, None
            self.out.write(f"attempt {job['attempt']}: the job starts over\n")
        self.job = job

    def steps(self, steps: list[dict[str, Any]]) -> None:
        """A batch of steps: advance the open epoch's bar."""
        for step in steps:
            # Steps of a later epoch (its accuracy not recorded yet) go to that epoch's bar.
            while step["epoch"] > self.epoch_done + 1:
                self.close()
                self.epoch_done += 1
            bar = self._open()
            bar.update(1)
            self.bar_steps += 1
            self.loss = step["loss"]
        if steps and self.bar is not None:
            self._postfix(self.bar)

    def epoch(self, epoch: dict[str, Any]) -> None:
        """An epoch's accuracy: shown on its bar, which then closes."""
        self.accuracy = epoch["accuracy"]
        bar = self._open()
        if bar.total and self.bar_steps < bar.total:
            bar.update(bar.total - self.bar_steps)
        self._postfix(bar)
        self.close()
        self.epoch_done = epoch["epoch"]

    def close(self) -> None:
        """Close the open bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def watch(client: Client, job_id: str, out: TextIO) -> dict[str, Any]:
    """Follow a job's events with epoch bars; returns the job as it ended."""
    bars = EpochBars(out)
    final: dict[str, Any] = {}
    try:
        for event in client.events(job_id):
            data = event.json()
            if event.event == "status":
                bars.status(data)
                final = data
            elif event.event == "step":
                bars.steps(data["steps"])
            elif event.event == "epoch":
                bars.epoch(data)
    finally:
        bars.close()
    return final
