"""Requests for the differential test: odd forms, raw images, queries, polls, keys.

Each is sent to an app with the fast lanes and to one without; the two must answer alike. The
limits the cases aim at are ``LIMITS``, the settings both apps run with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.api.routes.jobs import MAX_STEP, MAX_STEPS_PAGE
from tests.service.images import SVG, TEXT, png, png_claiming_size
from tests.support import synthetic_digits

KIB = 1024
LIMITS = {
    "max_upload_bytes": 16 * KIB,
    "max_request_bytes": 32 * KIB,
    "max_form_parts": 4,
    "max_images_per_request": 2,
    "max_form_field_bytes": 256,
}
FULL_KEY = "full-key-" + "f" * 23
READ_KEY = "read-key-" + "r" * 23
BOUNDARY = b"diff-boundary"
FORM = {"content-type": "multipart/form-data; boundary=" + BOUNDARY.decode()}
RAW = {"content-type": "image/png"}
UNKNOWN_JOB = "0123456789abcdef0123456789abcdef"


@dataclass(frozen=True)
class Case:
    """One request; ``keyed``: sent to the apps that require an API key."""

    name: str
    method: str
    url: str
    content: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    keyed: bool = False
    chunked: bool = False  # sent without a Content-Length


def form(*parts: bytes, preamble: bytes = b"", epilogue: bytes = b"\r\n") -> bytes:
    """A multipart body of ``parts`` (each its header lines, a blank line and its data)."""
    body = preamble
    for one in parts:
        body += b"--" + BOUNDARY + b"\r\n" + one + b"\r\n"
    return body + b"--" + BOUNDARY + b"--" + epilogue


def part(name: bytes = b"file", data: bytes = b"", filename: bytes | None = b"d.png") -> bytes:
    """A part with a Content-Disposition (a file when ``filename``) and a Content-Type."""
    disposition = b'Content-Disposition: form-data; name="' + name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    return disposition + b"\r\nContent-Type: image/png\r\n\r\n" + data


def images() -> dict[str, bytes]:
    """The images the cases send, from a few hundred bytes to past every cap."""
    digit = png(synthetic_digits(1, seed=41)[0][0])
    wide = np.zeros((200, 200), np.uint8)  # past the lane's pixels: the route decodes it
    wide[40:160, 95:105] = 255
    noisy = png(np.random.default_rng(3).integers(0, 256, (90, 90), dtype=np.uint8))
    upload = LIMITS["max_upload_bytes"]
    return {
        "digit": digit,
        "wide": png(wide),
        "noisy": noisy,
        "at upload cap": digit + b"\0" * (upload - len(digit)),  # PNG ignores what follows
        "over upload cap": digit + b"\0" * (upload + 1 - len(digit)),
        "over request cap": digit + b"\0" * (LIMITS["max_request_bytes"] + 1 - len(digit)),
        "truncated": digit[: len(digit) // 2],
        "bomb": png_claiming_size(20_000, 20_000),
    }


def form_cases(img: dict[str, bytes]) -> list[Case]:
    digit = img["digit"]
    file = part(data=digit)
    odd_header = {
        "space in a header name": b"Content Type",
        "@ in a header name": b"Content@Type",
        "( in a header name": b"Content(Type",
        "non-ASCII header name": b"C\xf6ntent-Type",
    }
    bodies: dict[str, bytes] = {
        "one file": form(file),
        "one file, no part content type": form(
            b'Content-Disposition: form-data; name="file"; filename="d.png"\r\n\r\n' + digit
        ),
        "epilogue": form(file, epilogue=b"\r\nthe end, and some more\r\n"),
        "30000 bytes after the closing delimiter": form(file, epilogue=b"\r\n" + b"x" * 30_000),
        "40000 bytes after the closing delimiter": form(file, epilogue=b"\r\n" + b"x" * 40_000),
        "no line break after the closing delimiter": form(file, epilogue=b""),
        "preamble": form(file, preamble=b"a preamble\r\n"),
        "leading line breaks": form(file, preamble=b"\r\n\r\n"),
        "two files named file": form(file, file),
        "file and files": form(file, part(b"files", digit)),
        "files alone": form(part(b"files", digit)),
        "three files": form(*[part(b"files", digit)] * 3),
        "another name": form(part(b"image", digit)),
        "missing filename": form(part(data=b"a text field", filename=None)),
        "missing filename, long": form(part(data=digit, filename=None)),
        "only filename*": form(
            b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''d.png\r\n\r\nx"
        ),
        "empty filename": form(part(data=digit, filename=b"")),
        "empty file": form(part()),
        "file over the upload cap": form(part(data=img["over upload cap"])),
        "file at the upload cap": form(part(data=img["at upload cap"])),
        "body over the request cap": form(part(data=img["over request cap"])),
        "too many parts": form(*[part(b"note%d" % i, b"x", None) for i in range(5)]),
        "long text field": form(part(b"note", b"n" * 300, None), file),
        "no Content-Disposition": form(b"Content-Type: image/png\r\n\r\nx"),
        "Content-Disposition without name": form(
            b'Content-Disposition: form-data; filename="d.png"\r\n\r\n' + digit
        ),
        "attachment disposition": form(file.replace(b"form-data;", b"attachment;")),
        "two dispositions, the last file": form(
            b'Content-Disposition: form-data; name="other"\r\n' + file
        ),
        "two dispositions, the last other": form(
            file.replace(
                b"\r\nContent-Type",
                b'\r\nContent-Disposition: form-data; name="x"; filename="d.png"\r\nContent-Type',
            )
        ),
        "header names in odd case": form(
            file.replace(b"Content-Disposition", b"content-DISPOSITION")
        ),
        "bare CR in a header value": form(file.replace(b"image/png", b"image\rpng")),
        "LF line endings": form(file).replace(b"\r\n", b"\n"),
        "folded header line": form(file.replace(b"\r\nContent-Type:", b"\r\n Content-Type:")),
        "header without a colon": form(file.replace(b"Content-Type:", b"Content-Type")),
        "9 part headers": form(b"".join(b"X-%d: 1\r\n" % i for i in range(8)) + file),
        "a 5000-byte header": form(part(data=digit, filename=b"n" * 5000)),
        "never closed": b"--" + BOUNDARY + b"\r\n" + file,
        "cut short after the file": (
            b"--" + BOUNDARY + b"\r\n" + file + b"\r\n--" + BOUNDARY + b"\r\n"
            b'Content-Disposition: form-data; name="note"\r\n\r\nunfinished'
        ),
        "closing delimiter only": b"--" + BOUNDARY + b"--\r\n",
        "delimiter look-alike in the data": form(
            part(data=digit + b"\r\n--" + BOUNDARY + b"X\r\n")
        ),
        "padding after an inner delimiter": form(part(b"note", b"x", None), file).replace(
            b"\r\n--" + BOUNDARY + b"\r\n", b"\r\n--" + BOUNDARY + b" \t\r\n"
        ),
        "base64 transfer encoding": form(
            file.replace(b"Content-Type", b"Content-Transfer-Encoding: base64\r\nContent-Type")
        ),
        "garbage file": form(part(data=TEXT)),
        "truncated file": form(part(data=img["truncated"])),
        "wide file": form(part(data=img["wide"])),
        "noisy file": form(part(data=img["noisy"])),
        "svg file": form(part(data=SVG)),
        **{name: form(file.replace(b"Content-Type", bad)) for name, bad in odd_header.items()},
    }
    cases = [Case(f"form: {name}", "POST", "/predict", b, FORM) for name, b in bodies.items()]
    content_types = {
        "charset utf-8": FORM["content-type"] + "; charset=utf-8",
        "charset utf-16": FORM["content-type"] + "; charset=utf-16",
        "quoted boundary": f'multipart/form-data; boundary="{BOUNDARY.decode()}"',
        "capitals": "Multipart/Form-Data; boundary=" + BOUNDARY.decode(),
        "no boundary": "multipart/form-data",
        "another boundary": "multipart/form-data; boundary=other",
        "a 300-byte boundary": "multipart/form-data; boundary=" + "b" * 300,
        "multipart/mixed": "multipart/mixed; boundary=" + BOUNDARY.decode(),
    }
    cases += [
        Case(f"form: {name}", "POST", "/predict", form(file), {"content-type": value})
        for name, value in content_types.items()
    ]
    return cases


def raw_cases(img: dict[str, bytes]) -> list[Case]:
    digit = img["digit"]
    sized = ["digit", "wide", "noisy", "at upload cap", "over upload cap", "over request cap"]
    cases = [Case(f"raw: {name}", "POST", "/predict", img[name], RAW) for name in sized]
    cases += [
        Case("raw: empty", "POST", "/predict", b"", RAW),
        Case("raw: truncated", "POST", "/predict", img["truncated"], RAW),
        Case("raw: text", "POST", "/predict", TEXT, RAW),
        Case("raw: bomb", "POST", "/predict", img["bomb"], RAW),
        Case("raw: svg", "POST", "/predict", SVG, {"content-type": "image/svg+xml"}),
        Case("raw: image/jpeg label", "POST", "/predict", digit, {"content-type": "image/jpeg"}),
        Case("raw: capitals", "POST", "/predict", digit, {"content-type": "IMAGE/PNG"}),
        Case("raw: a parameter", "POST", "/predict", digit, {"content-type": "image/png; q=1"}),
        Case("raw: text/plain", "POST", "/predict", digit, {"content-type": "text/plain"}),
        Case("raw: no content type", "POST", "/predict", digit),
        Case("raw: chunked", "POST", "/predict", digit, RAW, chunked=True),
        Case(
            "raw: chunked, over the cap",
            "POST",
            "/predict",
            img["over request cap"],
            RAW,
            chunked=True,
        ),
        Case("form: chunked", "POST", "/predict", form(part(data=digit)), FORM, chunked=True),
        Case(
            "raw: JSON pixels",
            "POST",
            "/predict",
            b'{"pixels": ' + str([[0] * 28] * 28).encode() + b"}",
            {"content-type": "application/json"},
        ),
    ]
    return cases


def query_cases(img: dict[str, bytes], trained: str, queued: str) -> list[Case]:
    queries = [
        "top_k=0",
        "top_k=1",
        "top_k=10",
        "top_k=11",
        "top_k=+3",
        "top_k=%2B3",
        "top_k=03",
        "top_k=3.0",
        "top_k=1_0",
        "top_k=",
        "top_k",
        "top_k=x",
        "top_k=1&top_k=2",
        f"job_id={trained}",
        f"job_id={trained}&top_k=2",
        f"job_id={trained.upper()}",
        f"job_id={UNKNOWN_JOB}",
        f"job_id={queued}",
        f"job_id={trained}%0A",
        "model=nope",
        "model=production",
        "model=-dash",
        "model=" + "a" * 65,
        f"model=nope&job_id={trained}",
        "x=1",
        "=1",
        "access_token=secret",
    ]
    cases: list[Case] = []
    for query in queries:
        cases.append(Case(f"query raw: {query}", "POST", f"/predict?{query}", img["digit"], RAW))
    for query in ("top_k=03", "top_k=11", f"job_id={UNKNOWN_JOB}", "x=1"):
        body = form(part(data=img["digit"]))
        cases.append(Case(f"query form: {query}", "POST", f"/predict?{query}", body, FORM))
    return cases


def poll_cases(trained: str, queued: str) -> list[Case]:
    polls = [
        "",
        "?after_step=0",
        "?after_step=5",
        "?after_step=19&limit=3",
        "?after_step=1000000",
        f"?after_step={MAX_STEP}",
        f"?after_step={MAX_STEP + 1}",
        "?after_step=" + "9" * 19,
        "?after_step=-1",
        "?after_step=abc",
        "?after_step=1.0",
        "?after_step=%2B5",
        "?after_step=05",
        "?after_step=1_0",
        "?after_step=",
        "?limit=0",
        "?limit=1",
        f"?limit={MAX_STEPS_PAGE}",
        f"?limit={MAX_STEPS_PAGE + 1}",
        "?limit=5&limit=6",
        "?after_step=1&after_step=1",
        "?after=5",
        "?after_step=2&x=",
    ]
    cases = [Case(f"poll: {q or 'plain'}", "GET", f"/jobs/{trained}/metrics{q}") for q in polls]
    cases += [
        Case("poll: a queued job", "GET", f"/jobs/{queued}/metrics"),
        Case("poll: unknown job", "GET", f"/jobs/{UNKNOWN_JOB}/metrics"),
        Case("poll: unknown job, bad query", "GET", f"/jobs/{UNKNOWN_JOB}/metrics?limit=0"),
        Case("poll: upper-case id", "GET", f"/jobs/{trained.upper()}/metrics"),
        Case("poll: id and a newline", "GET", f"/jobs/{trained}%0A/metrics"),
        Case("poll: not an id", "GET", "/jobs/nope/metrics"),
        Case("poll: trailing slash", "GET", f"/jobs/{trained}/metrics/"),
        Case("poll: HEAD", "HEAD", f"/jobs/{trained}/metrics"),
        Case("poll: POST", "POST", f"/jobs/{trained}/metrics"),
    ]
    return cases


def job_cases(trained: str, queued: str, running: str) -> list[Case]:
    jobs = {"trained": trained, "queued": queued, "running": running}
    cases = [Case(f"job: {name}", "GET", f"/jobs/{job_id}") for name, job_id in jobs.items()]
    cases += [
        Case("job: a query string", "GET", f"/jobs/{trained}?after_step=3&x="),
        Case("job: a name alone", "GET", f"/jobs/{trained}?x"),
        Case("job: an empty query", "GET", f"/jobs/{trained}?"),
        Case("job: a query of separators", "GET", f"/jobs/{trained}?&&"),
        Case("job: unknown", "GET", f"/jobs/{UNKNOWN_JOB}"),
        Case("job: upper-case id", "GET", f"/jobs/{trained.upper()}"),
        Case("job: id and a newline", "GET", f"/jobs/{trained}%0A"),
        Case("job: too short", "GET", f"/jobs/{trained[:-1]}"),
        Case("job: not an id", "GET", "/jobs/nope"),
        Case("job: trailing slash", "GET", f"/jobs/{trained}/"),
        Case("job: HEAD", "HEAD", f"/jobs/{trained}"),
        Case("job: PUT", "PUT", f"/jobs/{trained}"),
    ]
    return cases


def key_cases(img: dict[str, bytes], trained: str) -> list[Case]:
    keys = {
        "no key": {},
        "wrong key": {"authorization": "Bearer " + "w" * 32},
        "read-only key": {"authorization": "Bearer " + READ_KEY},
        "full key": {"authorization": "Bearer " + FULL_KEY},
    }
    cases: list[Case] = []
    for who, auth in keys.items():
        poll = f"/jobs/{trained}/metrics?after_step=3"
        cases += [
            Case(f"key {who}: raw", "POST", "/predict", img["digit"], {**RAW, **auth}, True),
            Case(
                f"key {who}: form",
                "POST",
                "/predict",
                form(part(data=img["digit"])),
                {**FORM, **auth},
                True,
            ),
            Case(f"key {who}: poll", "GET", poll, b"", auth, True),
            Case(f"key {who}: job", "GET", f"/jobs/{trained}", b"", auth, True),
        ]
    big = form(part(data=img["over request cap"]))
    odd = form(part(data=img["digit"]).replace(b"Content-Type", b"Content Type"))
    read = {"authorization": "Bearer " + READ_KEY}
    cases += [
        Case("key no key: body over the cap", "POST", "/predict", big, FORM, True),
        Case("key read-only: body over the cap", "POST", "/predict", big, {**FORM, **read}, True),
        Case("key read-only: odd form", "POST", "/predict", odd, {**FORM, **read}, True),
        Case("key read-only: bad poll", "GET", f"/jobs/{trained}/metrics?limit=0", b"", read, True),
    ]
    return cases


def corpus(trained: str, queued: str, running: str) -> list[Case]:
    """Every case; ``trained`` is a job with a model and steps, ``queued`` one without,
    ``running`` one a worker holds."""
    img = images()
    return [
        *form_cases(img),
        *raw_cases(img),
        *query_cases(img, trained, queued),
        *poll_cases(trained, queued),
        *job_cases(trained, queued, running),
        *key_cases(img, trained),
    ]
