"""The launcher's start of a local Ray node: a start that Ray reports as timed out is made again."""

from __future__ import annotations

import pytest


class _Ray:
    """Stands in for the ray module's init and shutdown: Ray's 30 s raylet registration limit cannot
    be made to expire on purpose here (it is hard-coded), so the failure is the exception Ray raises."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.calls: list[str] = []

    def init(self, **options) -> None:
        self.calls.append(f"init {options['address']}")
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self) -> None:
        self.calls.append("shutdown")


TIMED_OUT = Exception("The current node timed out during startup. This could happen because some of the raylet "
                      "failed to startup or the GCS has become overloaded.")


def test_a_local_node_that_timed_out_during_startup_is_started_again_once(caplog):
    """Breaks if the retry goes, if it retries other errors, or if it retries without end."""
    from orchestrator.launcher import _start_local_ray

    ray = _Ray([TIMED_OUT])
    _start_local_ray(ray, {"address": "local"})
    assert ray.calls == ["init local", "shutdown", "init local"]
    assert "did not start in time" in caplog.text
    ray = _Ray([TIMED_OUT, TIMED_OUT, TIMED_OUT])
    with pytest.raises(Exception, match="timed out during startup"):
        _start_local_ray(ray, {"address": "local"})
    assert ray.calls.count("init local") == 2
    ray = _Ray([ValueError("runtime_env is malformed")])
    with pytest.raises(ValueError):
        _start_local_ray(ray, {"address": "local"})
    assert ray.calls == ["init local"]
