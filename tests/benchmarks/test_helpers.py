"""The benchmark suite's helpers: statistics, report tables, wrk and py-spy output parsing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.__main__ import QUIET_BASELINE_S, host_speed_line
from benchmarks.load import multipart_body, parse_wrk
from benchmarks.profiling import parse_collapsed, short_frame
from benchmarks.report import Report, table
from benchmarks.stats import Series, fmt, median, median_interval, percentile, ratio

WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:8000/predict
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     7.10ms    1.20ms  30.00ms   90.00%
  10500 requests in 5.00s, 2.00MB read
Requests/sec:   2100.00
Transfer/sec:    400.00KB
{"requests": 10500, "duration_us": 5000000, "p50_us": 7000, "p90_us": 8500, \
"p99_us": 14000, "max_us": 30000, "non_2xx": 2, "socket_errors": 1}
"""


def test_median_and_percentiles() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError, match="no values"):
        median([])
    with pytest.raises(ValueError, match="outside"):
        percentile(values, 101)


def test_a_median_interval_holds_the_median_and_narrows_with_more_values() -> None:
    values = [float(v) for v in range(1, 23)]  # 22 values, as 3 × 7 rounds and one more give
    low, high, chance = median_interval(values)
    # The 6th smallest and the 6th largest: a Binomial(22, ½) is below 6 with p = 0.0085,
    # below 7 with 0.026 (more than the 0.025 a side that 95% leaves).
    assert (low, high) == (6.0, 17.0)
    assert chance == pytest.approx(1 - 2 * 35443 / 2**22)
    assert median_interval(list(reversed(values))) == (low, high, chance)  # order does not count
    more_low, more_high, more_chance = median_interval([float(v) for v in range(1, 201)])
    assert more_low <= 100.5 <= more_high and more_chance >= 0.95
    assert (more_high - more_low) / 200 < (high - low) / 22  # more pairs, a narrower share
    few_low, few_high, few_chance = median_interval([3.0, 1.0, 2.0])
    assert (few_low, few_high) == (1.0, 3.0) and few_chance == pytest.approx(0.75)
    assert median_interval([3.0]) == (3.0, 3.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        median_interval([])
    with pytest.raises(ValueError, match="outside"):
        median_interval(values, confidence=1.0)


def test_series_ratio_and_formatting() -> None:
    s = Series("job", "s")
    for v in (0.7, 0.5, 0.6):
        s.add(v)
    assert (s.median, s.spread) == (0.6, (0.5, 0.7))
    assert ratio(0.6, 0.5) == pytest.approx(1.2)
    assert math.isinf(ratio(1.0, 0.0))
    assert fmt(0.6, "s") == "0.600 s"
    assert fmt(2100.4, "req/s") == "2,100 req/s"
    assert fmt(13.94, "ms") == "13.9 ms"


def test_table_and_report(tmp_path: Path) -> None:
    assert table(["a", "b"], [[1, "x"]]) == ["| a | b |", "|---|---|", "| 1 | x |"]
    with pytest.raises(ValueError, match="cells"):
        table(["a", "b"], [[1]])
    report = Report("Benchmarks", preamble=["machine", ""])
    section = report.section("Training")
    section.para("some", "text")
    section.goal_table([["job ≤ 1.2× floor", "1.10×", "met"]])
    out = tmp_path / "docs" / "b.md"
    report.write(out)
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nmachine\n")
    # Goals appear in the section and again in the summary, before the sections.
    assert text.index("## Summary") < text.index("## Training")
    assert "| Training | job ≤ 1.2× floor | 1.10× | met |" in text
    assert "| job ≤ 1.2× floor | 1.10× | met |" in text.split("## Training")[1]


def test_parse_wrk_reads_the_scripts_result_line() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result.rps == pytest.approx(2100.0)
    assert (result.p50_ms, result.p90_ms, result.p99_ms, result.max_ms) == (7.0, 8.5, 14.0, 30.0)
    assert (result.non_2xx, result.socket_errors) == (2, 1)
    with pytest.raises(ValueError, match="no result line"):
        parse_wrk("Running 5s test\n")


def test_multipart_body_is_what_the_service_parses() -> None:
    body, content_type = multipart_body("file", "digit.png", "image/png", b"\x89PNG data")
    boundary = content_type.split("boundary=")[1]
    assert content_type.startswith("multipart/form-data; boundary=")
    assert body.startswith(f"--{boundary}\r\n".encode())
    assert b'name="file"; filename="digit.png"' in body
    assert body.endswith(f"\r\n\x89PNG data\r\n--{boundary}--\r\n".encode("latin-1"))


def test_collapsed_stacks_give_self_and_inclusive_shares() -> None:
    lines = [
        "main (/app/service/__main__.py:10);parse (/venv/python_multipart/multipart.py:5) 3\n",
        "main (/app/service/__main__.py:10);forward (/venv/torch/nn/modules/linear.py:1) 6\n",
        "main (/app/service/__main__.py:12) 1\n",
        "\n",
    ]
    profile = parse_collapsed(lines)
    assert profile.samples == 10
    assert profile.self_shares(2) == [("forward (linear.py)", 0.6), ("parse (multipart.py)", 0.3)]
    shares = profile.inclusive_shares({"multipart": "/python_multipart/", "torch": "/torch/"})
    assert shares == {"multipart": 0.3, "torch": 0.6, "other": pytest.approx(0.1)}
    assert short_frame("f (/a/b/c.py:3)") == "f (c.py)"
    assert short_frame("<idle>") == "<idle>"


def test_the_host_speed_line_says_how_much_slower_the_host_ran() -> None:
    quiet = host_speed_line(QUIET_BASELINE_S)
    assert quiet.endswith("(issue #7).") and "slower" not in quiet
    busy = host_speed_line(QUIET_BASELINE_S * 3)
    assert "about 3.0× slower" in busy and "Ratios to a baseline of the same run hold" in busy
