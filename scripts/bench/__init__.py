"""Benchmarks run as modules: ``python -m scripts.bench.aggregation``."""
