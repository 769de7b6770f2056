"""What predict's fast lane takes on itself; everything else is the route's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from service.api.lanes.predict import query_choice, single_file_part
from service.serving.registry import ModelChoice

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


async def starlette_reads(body: bytes) -> list[tuple[str, bytes | str]]:
    """What the route's parser (Starlette over python-multipart) makes of the same body."""

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    headers = Headers({"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"})
    parsed = await MultiPartParser(headers, stream()).parse()
    items: list[tuple[str, bytes | str]] = []
    for name, value in parsed.multi_items():
        items.append((name, await value.read() if isinstance(value, UploadFile) else value))
    await parsed.close()
    return items


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", (ModelChoice(), None)),
        (b"top_k=3", (ModelChoice(), 3)),
        (b"top_k=10", (ModelChoice(), 10)),
        (f"job_id={JOB}".encode(), (ModelChoice(job_id=JOB), None)),
        (f"model=production&job_id={JOB}&top_k=1".encode(), (ModelChoice(JOB, "production"), 1)),
        (b"model=canary.v2", (ModelChoice(alias="canary.v2"), None)),
    ],
)
def test_well_formed_queries_are_read(
    query: bytes, expected: tuple[ModelChoice, int | None]
) -> None:
    assert query_choice(query) == expected


@pytest.mark.parametrize(
    "query",
    [
        b"top_k=0",
        b"top_k=11",
        b"top_k=03",  # the route may read these; the lane leaves them to it
        b"top_k=+3",
        b"top_k=",
        b"top_k=3&top_k=4",  # repeated: the route's 422
        b"limit=3",  # unknown: the route's 422
        b"job_id=ABC",
        f"job_id={JOB}%0A".encode(),  # a trailing newline `$` would let through
        b"model=-leading-dash",
        b"model=" + b"a" * 65,
    ],
)
def test_every_other_query_is_left_to_the_route(query: bytes) -> None:
    assert query_choice(query) is None


def test_a_form_of_one_file_named_file_gives_exactly_the_routes_bytes() -> None:
    for body in [
        form(part()),
        form(part(), epilogue=b"\r\nanything after the end"),
        form(part(data=b"")),
    ]:
        data = single_file_part(body, BOUNDARY)
        assert data is not None
        assert asyncio.run(starlette_reads(body)) == [("file", data)]


@pytest.mark.parametrize(
    "body",
    [
        form(part(), preamble=b"a preamble\r\n"),
        form(part(), part()),  # two files: the route says `file` takes one
        form(part(b"files")),
        form(part(b"other")),
        form(part(filename=None)),  # a text field, not a file
        form(b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''d.png\r\n\r\nx"),
        form(b"Content-Type: image/png\r\n\r\n" + IMAGE),  # no disposition at all
        form(part().replace(b"Content-Type:", b" Content-Type:")),  # a folded header line
        form(part().replace(b"Content-Type: image/png", b"Content-Type image/png")),
        form(part() + b"\r\n--" + BOUNDARY + b"X"),  # a delimiter look-alike, then the end
        b"--" + BOUNDARY + b"\r\n" + part(),  # never closed
        form(b"X-Pad: " + b"p" * 5000 + b"\r\n" + part()),  # headers past python-multipart's
        form(b"".join(b"X-%d: 1\r\n" % i for i in range(8)) + part()),  # 10 headers
    ],
)
def test_every_other_form_is_left_to_the_route(body: bytes) -> None:
    assert single_file_part(body, BOUNDARY) is None
