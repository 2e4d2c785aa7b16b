"""orchestrator: chunked, preemption-proof training of vision models (driver side)."""

__version__ = "0.1.0"
