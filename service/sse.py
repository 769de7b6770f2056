"""Server-Sent Events read back: the CLI's (and the tests') parser of ``text/event-stream``.

The API writes events in FastAPI's format (``fastapi.sse``, :mod:`service.api.routes.events`);
reading is ours, since no runtime dependency of the project parses the format (httpx-sse, a
test dependency, does). The rules are the HTML standard's: fields ``id``, ``event``, ``data``
and ``retry``, a blank line ending each event, lines starting with ``:`` being comments.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    """One dispatched event: its type, its data (JSON here) and the stream's last event id."""

    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        """The data decoded as JSON (every event this service sends carries JSON)."""
        return json.loads(self.data)


def parse(lines: Iterable[str]) -> Iterator[Event]:
    """Events from a stream's lines (line endings removed), by the standard's rules.

    The last event id persists from event to event until a new ``id`` field sets it, as in a
    browser's ``EventSource``; an event with no ``data`` is not dispatched.
    """
    event_type = ""
    data: list[str] = []
    last_id: str | None = None
    for line in lines:
        if not line:
            if data:
                yield Event(event_type or "message", "\n".join(data), last_id)
            event_type, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event_type = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
