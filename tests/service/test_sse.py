"""The event-stream wire format: what FastAPI writes for the API, the CLI and tests read back."""

from __future__ import annotations

from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event

from service import sse


def lines(text: str) -> list[str]:
    return text.split("\n")


def test_what_fastapi_writes_parses_back() -> None:
    wire = b"".join(
        (
            format_sse_event(retry=1000),
            format_sse_event(event="status", data_str='{"status":"running","n":[1,2]}', id="1:0:0"),
            KEEPALIVE_COMMENT,
            format_sse_event(event="step", data_str='{"steps":[]}', id="1:5:0"),
        )
    )
    events = list(sse.parse(lines(wire.decode())))
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
