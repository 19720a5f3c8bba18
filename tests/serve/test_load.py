"""The bounded load test: the real server under 16 concurrent clients keeps one audit row per
request and answers every one (`bench/serve.py`, timings not asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench" / "serve.py"


@pytest.mark.slow
def test_concurrent_recommendations_lose_no_audit_row(iql_run):
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    result = bench.bench(iql_run, requests=300, concurrency=16, warmup=20)
    assert result["recommend"]["errors"] == 0 and result["bare"]["errors"] == 0
    assert result["audit_rows"] == result["expected_audit_rows"] == 320 and result["lost_audit_rows"] == 0
    assert result["distinct_audit_ids"] == 300 and result["other_audit_rows"] == 0
    assert result["recommend"]["p99_ms"] >= result["recommend"]["p50_ms"] > 0
