"""Benchmarks: each prints one JSON line and measures its own baseline in the same run."""

import os
import platform


def machine() -> str:
    """The machine a figure was measured on, as every bench's JSON names it."""
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}"
