"""What the edge refuses in a request's head (service/api/edge/heads.py), case by case; the
answers on the wire are the edge's tests' (test_protocol.py)."""

from __future__ import annotations

import logging
import time

import httptools
import pytest

from service.api.edge import heads
from service.api.edge.heads import malformed, of_method, refusal
from service.errors import BadRequest, RequestTimeout

HOST = (b"host", b"x")


@pytest.mark.parametrize(
    ("headers", "version", "status"),
    [
        ([HOST], "1.1", None),
        ([], "1.0", None),
        ([HOST], "1.0", None),
        ([], "1.1", 400),
        ([HOST, HOST], "1.1", 400),
        ([HOST, HOST], "1.0", 400),
        ([HOST, (b"transfer-encoding", b"chunked")], "1.1", None),
        ([HOST, (b"transfer-encoding", b"Chunked")], "1.1", None),
        ([HOST, (b"transfer-encoding", b" , chunked")], "1.1", None),
        ([HOST, (b"transfer-encoding", b"gzip, chunked")], "1.1", 501),
        ([HOST, (b"transfer-encoding", b"br"), (b"transfer-encoding", b"chunked")], "1.1", 501),
        ([(b"transfer-encoding", b"chunked")], "1.0", 400),
        ([HOST, (b"content-length", b"2")], "1.0", None),
        ([HOST], "0.9", 505),  # llhttp takes it, with headers: neither 1.0's rules nor 1.1's
        ([HOST, (b"transfer-encoding", b"chunked")], "0.9", 505),
    ],
)
def test_a_head_is_refused_by_its_host_and_transfer_codings(
    headers: list[tuple[bytes, bytes]], version: str, status: int | None
) -> None:
    error = refusal(headers, version)
    assert (error and error.status_code) == status, error


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"FOO /jobs HTTP/1.1\r\nHost: x\r\n\r\n", 501),
        (b"get / HTTP/1.0\r\n\r\n", 501),
        (b"M-SEARCH * HTTP/1.1\n", 501),
        (b"F(O /jobs HTTP/1.1\r\n\r\n", 400),  # no token
        (b"FOO /jobs HTTP/2.0\r\n\r\n", 400),  # no HTTP/1 request line
        (b"FOO /jobs\r\n\r\n", 400),
        (bytes.fromhex("160301020001000001fc0303"), 400),  # a TLS handshake
        (b"", 400),
    ],
)
def test_refused_bytes_are_501_only_as_a_request_line(request_bytes: bytes, status: int) -> None:
    assert malformed(request_bytes).status_code == status


def parser_error(data: bytes) -> Exception:
    try:
        httptools.HttpRequestParser(object()).feed_data(data)
    except httptools.HttpParserError as error:
        return error
    raise AssertionError(f"llhttp took {data!r}")


@pytest.mark.parametrize(
    ("request_bytes", "for_its_method"),
    [
        (b"FOO / HTTP/1.1\r\n", True),
        (b"DESCRIBE / HTTP/1.1\r\n", True),  # RTSP's: llhttp knows it, but not in HTTP
        (b"GET_PARAMETER / HTTP/1.1\r\n", True),
        (b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", False),
        (b"GET / HTTP/1.2\r\n\r\n", False),
    ],
)
def test_what_llhttp_refuses_for_its_method_is_told_apart(
    request_bytes: bytes, for_its_method: bool
) -> None:
    assert of_method(parser_error(request_bytes)) is for_its_method


def test_a_long_method_is_named_in_part() -> None:
    error = malformed(b"X" * 5000 + b" / HTTP/1.1\r\n")
    assert error.status_code == 501 and len(error.message) < 200


def test_refusals_of_one_status_are_logged_once_a_second_and_counted_in_full(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crowd of slow clients, each refused, logged 6,560 lines in 40 s."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(heads, "_refusal_logged_at", {})
    monkeypatch.setattr(heads, "_refusals_left_out", {})
    late, bad = RequestTimeout("the request body stalled for 10 s"), BadRequest("not HTTP")
    with caplog.at_level(logging.WARNING, logger="service.edge"):
        for i in range(100):
            heads.note_refusal(None, ("10.0.0.1", i), late)
        heads.note_refusal(None, ("10.0.0.2", 1), bad)  # another status: a line of its own
        now[0] += heads.REFUSALS_LOGGED_EVERY_S
        heads.note_refusal(None, ("10.0.0.1", 100), late)
    assert [r.getMessage() for r in caplog.records] == [
        "refused ('10.0.0.1', 0): 408 the request body stalled for 10 s",
        "refused ('10.0.0.2', 1): 400 not HTTP",
        "refused ('10.0.0.1', 100): 408 the request body stalled for 10 s"
        " (and 99 more refused 408 since the last such line)",
    ]
