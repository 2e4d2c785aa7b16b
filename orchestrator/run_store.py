"""The run record moved into the engine (orchestrator/engine/record.py); this name stays for the
callers that import it from here (tests, bench)."""

from orchestrator.engine.record import STALE_AFTER_S, RunRecord, load, read_optional, run_dir, save

__all__ = ["STALE_AFTER_S", "RunRecord", "load", "read_optional", "run_dir", "save"]
