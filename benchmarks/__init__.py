"""Benchmarks of r2ec-fast (DESIGN §7): one shared runner (`harness.py`) and one script per op
(`bench_<op>.py`) that registers its cases. Run them with `r2ec-fast bench`.

Installed as `r2ec_fast.benchmarks`; import it under that name only, like `r2ec_fast.kernels`
(a bare top-level `benchmarks` would shadow, or be shadowed by, unrelated packages).
"""
if __name__ != "r2ec_fast.benchmarks":
    raise ImportError(
        "the r2ec-fast benchmarks are installed as `r2ec_fast.benchmarks`; import them under "
        "that name (or run `r2ec-fast bench`), not as a bare `benchmarks`."
    )


def available_ops() -> list[str]:
    """Ops with a benchmark script (`bench_<op>.py`); cheap: imports nothing."""
    from pathlib import Path

    return sorted(p.stem[len("bench_"):] for p in Path(__file__).parent.glob("bench_*.py"))
