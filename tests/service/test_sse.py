"""The event-stream wire format: what the API writes, the CLI and tests read back."""

from __future__ import annotations

import math

import pytest

from service import sse


def lines(text: str) -> list[str]:
    return text.split("\n")


def test_encoded_events_parse_back() -> None:
    text = (
        sse.retry(1000)
        + sse.encode("status", {"status": "running", "n": [1, 2]}, event_id="1:0:0")
        + sse.comment("keep-alive")
        + sse.encode("step", {"steps": []}, event_id="1:5:0")
    )
    events = list(sse.parse(lines(text)))
    assert [(e.event, e.id) for e in events] == [("status", "1:0:0"), ("step", "1:5:0")]
    assert events[0].json() == {"status": "running", "n": [1, 2]}


def test_parse_follows_the_standard() -> None:
    text = "data: a\ndata:b\n\n: comment\nid: 7\n\nevent: x\ndata\n\nid: bad\0id\ndata: c\n\n"
    events = list(sse.parse(lines(text)))
    # Multi-line data is joined; the id persists; "data" alone is an empty line of data;
    # an id with NUL is ignored; an event without data (the id-only block) is not dispatched.
    assert events == [
        sse.Event("message", "a\nb", None),
        sse.Event("x", "", "7"),
        sse.Event("message", "c", "7"),
    ]


def test_payloads_are_one_line_and_never_nan() -> None:
    assert sse.encode("e", {"text": "two\nlines"}).count("\n") == 3
    with pytest.raises(ValueError):
        sse.encode("e", {"loss": math.nan})
