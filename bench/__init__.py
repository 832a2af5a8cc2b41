"""Benchmarks: `python -m bench` (the suite) or `python -m bench --quick`."""
