"""A burst of large 16-bit uploads against a real server: memory stays bounded (issue #14).

Each upload is a few tens of KB that decodes to 16 Mpx of 16-bit pixels. Before the decode
slots and the strip-wise conversion, eight at once cost the API +2.7 GB; forty at once must
now keep it under 1.5 GB, and ``/healthz`` must keep answering meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import MAX_DEFAULT_DECODES
from tests.service.api.routes.conftest import model_server
from tests.service.images import big_16_bit_png

UPLOADS = 40
MAX_PEAK_RSS_MB = 1500
HEALTHZ_ANSWER_S = 5.0  # "still answered", not a latency goal (seen up to 1 s on a loaded host)
MB = 1024 * 1024


def memory_mb(pid: int) -> dict[str, float]:
    """The process's resident set now (VmRSS) and at its highest so far (VmHWM), in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024 / MB
    return fields


@pytest.fixture
def trained_server(sqlite_url: str, small_mnist: Path, tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A real ``python -m service`` serving a model a real worker trained: (its pid, its URL)."""
    with model_server(
        sqlite_url,
        small_mnist,
        tmp_path,
        epochs=1,
        access_log="false",
        # The most decode slots any machine gets by default (its cores, at most this).
        max_decodes=str(MAX_DEFAULT_DECODES),
    ) as (proc, client):
        yield proc.pid, str(client.base_url)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_forty_16_mpx_16_bit_uploads_keep_the_api_under_1_5_gb(
    trained_server: tuple[int, str], capsys: pytest.CaptureFixture[str]
) -> None:
    pid, url = trained_server
    body = big_16_bit_png()
    raw = {"content-type": "image/png"}
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/predict", content=body, headers=raw).status_code == 200  # warm
    before = memory_mb(pid)

    statuses: list[int] = []
    healthz_s: list[float] = []
    burst_over = threading.Event()
    start = threading.Barrier(UPLOADS + 1)

    def upload() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            start.wait()
            statuses.append(client.post("/predict", content=body, headers=raw).status_code)

    def probe_health() -> None:
        with httpx.Client(base_url=url, timeout=HEALTHZ_ANSWER_S * 5) as client:
            start.wait()
            while not burst_over.is_set():
                began = time.monotonic()
                assert client.get("/healthz").status_code == 200
                healthz_s.append(time.monotonic() - began)
                burst_over.wait(0.1)

    uploads = [threading.Thread(target=upload) for _ in range(UPLOADS)]
    prober = threading.Thread(target=probe_health)
    began = time.monotonic()
    for thread in [*uploads, prober]:
        thread.start()
    for thread in uploads:
        thread.join(timeout=120)
    burst_s = time.monotonic() - began
    burst_over.set()
    prober.join(timeout=30)
    after = memory_mb(pid)

    with capsys.disabled():
        print(
            f"\n{UPLOADS} concurrent 4000×4000 16-bit PNGs ({len(body) // 1024} KB each) in "
            f"{burst_s:.1f} s: API RSS {before['VmRSS']:.0f} MB before, peak "
            f"{after['VmHWM']:.0f} MB, {after['VmRSS']:.0f} MB after; /healthz answered "
            f"{len(healthz_s)} times meanwhile, slowest {max(healthz_s, default=0):.2f} s"
        )
    assert statuses == [200] * UPLOADS
    assert after["VmHWM"] < MAX_PEAK_RSS_MB
    assert len(healthz_s) >= 3 and max(healthz_s) < HEALTHZ_ANSWER_S
