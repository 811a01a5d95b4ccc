"""Aerie's benchmarks: `python -m bench.serving`, ..."""
