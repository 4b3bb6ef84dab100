"""Benchmarks: ``python -m bench.experts``."""
