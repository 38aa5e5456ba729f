"""Benchmarks that print ratios measured in one run (no timed tests): ``python -m scripts.bench.<name>``."""
