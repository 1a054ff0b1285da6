"""Benchmarks for zserve (run with `python -m bench`)."""
