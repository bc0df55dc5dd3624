"""Benchmarks (figures in bench/RESULTS.md): run as scripts, `python bench/NAME.py`; the top room, it may import any."""
