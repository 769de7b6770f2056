"""Micro-batching: requests of one event-loop turn share a forward pass, and each gets its rows."""

from __future__ import annotations

import asyncio

import pytest
import torch

from service.ml import SimpleMLP
from service.serving.batching import ForwardBatcher


def model(seed: int) -> SimpleMLP:
    torch.manual_seed(seed)
    return SimpleMLP().eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def alone(m: SimpleMLP, x: torch.Tensor) -> list[list[float]]:
    """What one request would get with no one to share its pass with."""
    with torch.inference_mode():
        rows: list[list[float]] = torch.softmax(m(x).double(), dim=1).tolist()
    return rows


def test_requests_of_one_turn_share_a_pass_and_each_gets_its_own_rows() -> None:
    batcher, m = ForwardBatcher(), model(0)
    requests = [images(n, seed=n) for n in (1, 3, 1, 2)]

    async def main() -> list[list[list[float]]]:
        return await asyncio.gather(*(batcher.probabilities("m", m, x) for x in requests))

    answers = asyncio.run(main())
    assert batcher.passes == 1
    assert [len(a) for a in answers] == [1, 3, 1, 2]
    for x, rows in zip(requests, answers, strict=True):
        # One matrix product over the batch may round differently from one per request.
        torch.testing.assert_close(torch.tensor(rows), torch.tensor(alone(m, x)))
        assert all(abs(sum(row) - 1) < 1e-12 for row in rows)


def test_a_request_alone_in_its_turn_waits_for_nobody() -> None:
    batcher, m = ForwardBatcher(), model(1)
    x = images(2, seed=5)

    async def main() -> list[list[list[float]]]:
        return [await batcher.probabilities("m", m, x) for _ in range(3)]  # one after another

    answers = asyncio.run(main())
    assert batcher.passes == 3
    assert all(rows == alone(m, x) for rows in answers)  # a batch of itself: the same numbers


def test_each_model_gets_its_own_pass() -> None:
    batcher, first, second = ForwardBatcher(), model(2), model(3)
    x = images(1, seed=7)

    async def main() -> tuple[list[list[float]], ...]:
        return await asyncio.gather(
            batcher.probabilities("a", first, x),
            batcher.probabilities("b", second, x),
            batcher.probabilities("a", first, x),
        )

    a1, b, a2 = asyncio.run(main())
    assert batcher.passes == 2
    assert a1 == a2
    torch.testing.assert_close(torch.tensor(b), torch.tensor(alone(second, x)))
    assert b != a1


def test_a_key_that_names_a_new_model_is_never_answered_by_the_old_one() -> None:
    batcher, old, new = ForwardBatcher(), model(4), model(5)  # a checkpoint evicted and reloaded
    x = images(1, seed=8)

    async def main() -> tuple[list[list[float]], ...]:
        return await asyncio.gather(
            batcher.probabilities("m", old, x), batcher.probabilities("m", new, x)
        )

    from_old, from_new = asyncio.run(main())
    assert from_old == alone(old, x) and from_new == alone(new, x)


def test_a_large_gathering_runs_as_several_bounded_passes() -> None:
    batcher, m = ForwardBatcher(max_batch_images=4), model(6)
    requests = [images(3, seed=s) for s in range(4)] + [images(9, seed=9)]  # 9 > the bound

    async def main() -> list[list[list[float]]]:
        return await asyncio.gather(*(batcher.probabilities("m", m, x) for x in requests))

    answers = asyncio.run(main())
    assert batcher.passes == 5  # 3 + 3 > 4: one request per pass, the large one alone
    for x, rows in zip(requests, answers, strict=True):
        torch.testing.assert_close(torch.tensor(rows), torch.tensor(alone(m, x)))


def test_a_failed_pass_reaches_every_request_and_the_next_turn_works() -> None:
    batcher, m = ForwardBatcher(), model(7)
    good, wrong_shape = images(1, seed=1), torch.zeros(1, 1, 5, 5)

    async def main() -> tuple[object, ...]:
        return await asyncio.gather(
            batcher.probabilities("m", m, good),
            batcher.probabilities("m", m, wrong_shape),
            return_exceptions=True,
        )

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)  # one batch: both hear of it

    async def again() -> list[list[float]]:
        return await batcher.probabilities("m", m, good)

    assert asyncio.run(again()) == alone(m, good)


def test_a_cancelled_request_does_not_disturb_the_others() -> None:
    batcher, m = ForwardBatcher(), model(8)
    x = images(1, seed=2)

    async def main() -> list[list[float]]:
        gone = asyncio.ensure_future(batcher.probabilities("m", m, x))
        kept = asyncio.ensure_future(batcher.probabilities("m", m, x))
        await asyncio.sleep(0)  # both are waiting for the end of this turn
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await kept

    torch.testing.assert_close(torch.tensor(asyncio.run(main())), torch.tensor(alone(m, x)))
