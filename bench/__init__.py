"""Benchmark harnesses (run as `python -m bench.<name>` from the repository root; see bench/README.md).

Not tests: pytest collects `tests/` only, and nothing here is named `test_*`.
"""
