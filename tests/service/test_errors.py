"""Errors carry ``Retry-After`` one way: from their ``retry_after_s``, the class's or their own."""

from __future__ import annotations

from service.errors import RETRY_AFTER_S, AtCapacity, NotReady, TooManyRequests


def test_an_error_given_retry_after_s_carries_the_header() -> None:
    error = TooManyRequests("the queue is full", retry_after_s=30)
    assert error.retry_after_s == 30
    assert error.headers == {"Retry-After": "30"}
    assert TooManyRequests("busy").headers == {}  # none given: none sent


def test_a_class_default_applies_unless_one_error_names_its_own() -> None:
    assert NotReady("no workers").headers == {"Retry-After": str(RETRY_AFTER_S)}
    assert NotReady("no workers", retry_after_s=9).headers == {"Retry-After": "9"}
    assert NotReady.retry_after_s == RETRY_AFTER_S  # the class's default is left as it was


def test_other_headers_travel_with_it() -> None:
    error = AtCapacity("full", headers={"X-Reason": "streams"}, retry_after_s=5)
    assert error.headers == {"X-Reason": "streams", "Retry-After": "5"}
