"""Benchmarks: each prints one JSON line and measures its own baseline in the same run."""
