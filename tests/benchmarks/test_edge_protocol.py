"""The edge benchmark's in-process measurement: both protocols answer every request it feeds."""

from __future__ import annotations

from benchmarks.edge_protocol import protocol_costs


def test_both_protocols_answer_every_keep_alive_request() -> None:
    costs = protocol_costs(1)  # raises when a protocol closes or leaves a request unanswered
    assert set(costs) == {"uvicorn's httptools", "the edge's"}
    assert all(len(v) == 1 and v[0] > 0 for v in costs.values())
