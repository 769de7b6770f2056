"""What the edge refuses in a request's head (service/api/edge/heads.py), case by case; the
answers on the wire are the edge's tests' (test_protocol.py)."""

from __future__ import annotations

import pytest

from service.api.edge.heads import malformed, refusal

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
