"""Benchmarks: each script runs on its own (python bench/NAME.py); report.py runs them all."""
