"""Sweeps, reports and benchmarks (run as ``python -m scripts.<name>``)."""
