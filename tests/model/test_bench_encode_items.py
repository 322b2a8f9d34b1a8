"""The encode_items benchmark end to end on its smoke case (no memory subprocesses)."""
import io
import math

from r2ec_fast.benchmarks import harness


def test_smoke_case_runs_and_reports():
    out = io.StringIO()
    report = harness.run_op("encode_items", "cpu", "smoke",
                            harness.Options(memory=False, out=out))
    (case,) = report["cases"]
    results = {r["impl"]: r for r in case["results"]}
    assert set(results) == {"fixed", "budget"}
    for r in results.values():
        assert "failed" not in r, r
        assert r["max_error"] < 1e-5  # fp32 vs the float64 checkpoint, both batchings
        assert math.isfinite(r["tflops"])
    assert case["shape"]["forwards"] >= 2 and case["bytes_read"] > 0
    (check,) = case["checks"]  # no acceptance target on the smoke case: figures only
    assert check["passed"] is None and "items/s" in check["value"]
    assert "budget" in check["value"] and "fixed" in check["value"]
    assert "encode_items  gemma2 items=200 d=32" in out.getvalue()
