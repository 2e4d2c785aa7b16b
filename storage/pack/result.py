"""What `pack` returns, and the error it raises when it cannot finish."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class PackError(RuntimeError):
    """The pack cannot finish (bad samples without --skip-bad, or nothing to pack); names them."""


@dataclass
class PackResult:
    """One pack's outcome: built by keyword (`PackResult(dest=..., packed=...)`), filled in as it goes."""

    dest: str
    packed: int = 0  # samples in the dataset
    skipped: list[dict[str, str]] = field(default_factory=list)  # bad samples: sample, path, reason
    unlisted: list[str] = field(default_factory=list)  # source files no label line or manifest row names
    shards: int = 0
    parts: int = 0
    parts_reused: int = 0  # parts an earlier, interrupted pack had committed
    seconds: float = 0.0
    manifest: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)
