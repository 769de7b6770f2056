"""What predict's fast lane takes on itself; everything else is the route's.

The lane re-states none of the route's rules: the query is read with the route's model, and a
form's file comes from the body limits' guard (python-multipart, as for Starlette's parser).
These tests hold the lane's readings against the route's: Starlette's parser over the same
bytes, and the route's query model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.api.lanes.predict import QUERY, file_part
from service.api.limits import MultipartGuard
from service.errors import BadRequest

JOB = "0123456789abcdef0123456789abcdef"
BOUNDARY = b"b0undary"
IMAGE = b"\x89PNG\r\n\x1a\n not really, but bytes \r\n with line breaks \r\n--b0und"


def form(*parts: bytes, preamble: bytes = b"", epilogue: bytes = b"\r\n") -> bytes:
    body = preamble
    for part in parts:
        body += b"--" + BOUNDARY + b"\r\n" + part + b"\r\n"
    return body + b"--" + BOUNDARY + b"--" + epilogue


def part(name: bytes = b"file", *, filename: bytes | None = b"d.png", data: bytes = IMAGE) -> bytes:
    disposition = b'Content-Disposition: form-data; name="' + name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    return disposition + b"\r\nContent-Type: image/png\r\n\r\n" + data


async def starlette_reads(body: bytes, chunk: int) -> list[tuple[str, bytes | str]] | None:
    """What the route's parser (Starlette over python-multipart) makes of the same body; None
    when it refuses it."""

    async def stream() -> AsyncGenerator[bytes, None]:
        for start in range(0, len(body), chunk):
            yield body[start : start + chunk]

    headers = Headers({"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"})
    try:
        parsed = await MultiPartParser(headers, stream()).parse()
    except MultiPartException:
        return None
    items: list[tuple[str, bytes | str]] = []
    for name, value in parsed.multi_items():
        items.append((name, await value.read() if isinstance(value, UploadFile) else value))
    await parsed.close()
    return items


def lane_reads(body: bytes, chunk: int, *, budget: int | None = None) -> bytes | None:
    """The file the lane would take from the guard that read ``body`` in chunks of ``chunk``."""
    guard = MultipartGuard(BOUNDARY, max_parts=32, max_field_bytes=65536)
    guard.collect(len(body) if budget is None else budget)
    for start in range(0, len(body), chunk):
        guard.feed(body[start : start + chunk])
    return file_part(guard)


CHUNKS = [1, 7, 64, 1 << 20]  # byte by byte, odd splits, a whole body at once


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", (None, None, None)),
        (b"top_k=3", (None, None, 3)),
        (b"top_k=10", (None, None, 10)),
        (b"top_k=03", (None, None, 3)),  # as the route reads them: the same model
        (f"job_id={JOB}".encode(), (JOB, None, None)),
        (f"model=production&job_id={JOB}&top_k=1".encode(), (JOB, "production", 1)),
        (b"model=canary.v2", (None, "canary.v2", None)),
    ],
)
def test_queries_the_route_takes_are_read_as_it_reads_them(
    query: bytes, expected: tuple[str | None, str | None, int | None]
) -> None:
    read = QUERY.read(query)
    assert read is not None
    assert (read.job_id, read.model, read.top_k) == expected


@pytest.mark.parametrize(
    "query",
    [
        b"top_k=0",
        b"top_k=11",
        b"top_k=",
        b"top_k=x",
        b"top_k=+3",  # decimal digits only (QueryInt), as the route takes them
        b"top_k=3.0",
        b"top_k=1_0",
        b"top_k=3&top_k=4",  # repeated: the route's 422
        b"limit=3",  # unknown: the route's 422
        b"job_id=ABC",
        f"job_id={JOB}%0A".encode(),  # a trailing newline
        b"model=-leading-dash",
        b"model=" + b"a" * 65,
    ],
)
def test_every_other_query_is_left_to_the_route(query: bytes) -> None:
    assert QUERY.read(query) is None


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    "body",
    [
        form(part()),
        form(part(), epilogue=b"\r\nanything after the end"),  # the epilogue is skipped
        form(part(), preamble=b"\r\n\r\n"),  # python-multipart skips leading line breaks
        form(part(data=b"")),
        form(part(data=IMAGE + b"\r\n--" + BOUNDARY + b"X")),  # a delimiter look-alike
        form(part().replace(b"form-data;", b"attachment;")),  # the route reads only the name
        form(part().replace(b"Content-Disposition", b"content-DISPOSITION")),
        form(b'Content-Disposition: form-data; name="other"\r\n' + part()),  # the last one counts
    ],
)
def test_a_form_of_one_file_named_file_gives_exactly_the_routes_bytes(
    body: bytes, chunk: int
) -> None:
    data = lane_reads(body, chunk)
    assert data is not None
    assert asyncio.run(starlette_reads(body, chunk)) == [("file", data)]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    "body",
    [
        form(part(), part()),  # two files: the route says `file` takes one
        form(part(b"files")),  # a batch of one: the route's answer has another shape
        form(part(b"other")),
        form(part(filename=None)),  # a text field, not a file
        form(b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''d.png\r\n\r\nx"),
        form(b"Content-Type: image/png\r\n\r\n" + IMAGE),  # no disposition at all
        b"--" + BOUNDARY + b"\r\n" + part(),  # never closed
        b"--" + BOUNDARY + b"--\r\n",  # no part at all
    ],
)
def test_every_other_form_is_left_to_the_route(body: bytes, chunk: int) -> None:
    assert lane_reads(body, chunk) is None
    assert asyncio.run(starlette_reads(body, chunk)) != [("file", IMAGE)]


def test_a_form_cut_short_is_left_to_the_route_even_where_the_route_reads_it() -> None:
    # The file part is complete, the next part never ends: Starlette hands the route the file
    # (python-multipart does not insist on the closing delimiter). The lane answers only forms
    # it has read to their end, and leaves this one to the route, whose answer it would be.
    body = b"--" + BOUNDARY + b"\r\n" + part() + b"\r\n--" + BOUNDARY + b"\r\n"
    body += b'Content-Disposition: form-data; name="note"\r\n\r\nunfinished'
    assert lane_reads(body, 64) is None
    assert asyncio.run(starlette_reads(body, 64)) == [("file", IMAGE)]


@pytest.mark.parametrize(
    "body",
    [
        form(part(), preamble=b"a preamble\r\n"),
        form(part().replace(b"Content-Type:", b"Content Type:")),  # a space in a header name
        form(part().replace(b"Content-Type:", b"Content@Type:")),
        form(part().replace(b"Content-Type:", b"Content(Type:")),
        form(part().replace(b"Content-Type:", b"C\xf6ntent-Type:")),  # not ASCII
        form(part().replace(b"image/png", b"image\rpng")),  # a bare CR in a value
        form(part().replace(b"Content-Type:", b" Content-Type:")),  # a folded header line
        form(part().replace(b"Content-Type: image/png", b"Content-Type image/png")),
        form(b"X-Pad: " + b"p" * 5000 + b"\r\n" + part()),  # headers past python-multipart's
        form(b"".join(b"X-%d: 1\r\n" % i for i in range(8)) + part()),  # 10 headers
    ],
)
def test_forms_python_multipart_refuses_are_refused_before_the_lane_reads_them(
    body: bytes,
) -> None:
    # The guard refuses them as the bytes pass (the body limits' 400, with or without the
    # lane), and so would Starlette's parser.
    with pytest.raises(BadRequest, match="cannot be read"):
        lane_reads(body, 64)
    assert asyncio.run(starlette_reads(body, 64)) is None


def test_a_form_past_the_collecting_budget_or_with_a_charset_is_left_to_the_route() -> None:
    body = form(part())
    assert lane_reads(body, 64, budget=len(IMAGE)) is not None
    assert lane_reads(body, 64, budget=len(IMAGE) - 1) is None
    # Starlette decodes the part's name with the form's charset: the route judges it.
    guard = MultipartGuard(BOUNDARY, max_parts=32, max_field_bytes=65536, charset=b"utf-16")
    guard.collect(len(body))
    guard.feed(body)
    assert guard.ended and file_part(guard) is None


def test_an_uncollected_form_is_never_the_lanes() -> None:
    guard = MultipartGuard(BOUNDARY, max_parts=32, max_field_bytes=65536)
    guard.feed(form(part()))
    assert guard.ended and guard.collected is None and file_part(guard) is None
