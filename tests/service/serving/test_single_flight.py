"""One computation per key on the event loop: shared, outliving a caller that leaves, not kept."""

from __future__ import annotations

import anyio

from service.serving.single_flight import SingleFlight
from tests.support import wait_until

WAIT_S = 30.0


def test_a_caller_that_leaves_cancels_neither_the_computation_nor_the_others() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    release = anyio.Event()
    computed: list[int] = []
    answers: list[int] = []

    async def compute() -> int:
        await release.wait()
        computed.append(len(computed) + 1)
        return computed[-1]

    async def ask() -> None:
        answers.append(await flight.run("k", compute))

    async def leave_early(scope: anyio.CancelScope) -> None:
        with scope:
            await flight.run("k", compute)

    async def main() -> None:
        leaver = anyio.CancelScope()
        async with anyio.create_task_group() as tasks:
            try:
                tasks.start_soon(leave_early, leaver)  # the call that starts the computation
                await wait_until(lambda: flight.waiting("k") == 1, timeout_s=WAIT_S, what="1")
                tasks.start_soon(ask)
                tasks.start_soon(ask)
                await wait_until(lambda: flight.waiting("k") == 3, timeout_s=WAIT_S, what="3")
                leaver.cancel()  # its client hangs up while it waits
                await wait_until(lambda: flight.waiting("k") == 2, timeout_s=WAIT_S, what="2")
            finally:
                release.set()  # even on failure: waiters left blocked would hang the test
        # Done and not kept: the next call computes again.
        answers.append(await flight.run("k", compute))

    anyio.run(main)
    assert answers == [1, 1, 2] and computed == [1, 2]
    assert flight.waiting("k") == 0
