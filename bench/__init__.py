"""Benchmarks: each is a module run with ``python -m bench.<name>`` (see docs/benchmarks.md)."""
