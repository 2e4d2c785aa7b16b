"""TrainState: everything that must survive a preemption, saved and restored as one object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Cursor:
    """Where the run stands: the next batch to train is (stage, chunk, epoch, batch)."""

    stage: int = 0
    chunk: int = 0
    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    samples_seen: int = 0
    interruptions: int = 0
    done: bool = False


@dataclass
class TrainState:
    model: torch.nn.Module
    cursor: Cursor = field(default_factory=Cursor)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    optimizer_stage: int = -1  # the stage the optimizer was built for
    chunk_log: list[dict[str, Any]] = field(default_factory=list)
    # Metrics not yet sent to MLflow. They ride in the checkpoint and are sent after it commits,
    # so MLflow never holds a point from steps that a resume will train again.
    pending_metrics: list[tuple[str, float, int]] = field(default_factory=list)
    last_eval: dict[str, float] = field(default_factory=dict)
    interruption_log: list[dict[str, Any]] = field(default_factory=list)
    # fp16's loss scaler (workers/precision.py); None in fp32 and bf16. Its scale and growth
    # tracker are part of the trajectory: a resume without them would step differently.
    scaler: torch.amp.GradScaler | None = None

    def state_dict(self) -> dict[str, Any]:
        sd = {
            "cursor": asdict(self.cursor),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "optimizer_stage": self.optimizer_stage,
            "chunk_log": [dict(x) for x in self.chunk_log],
            "pending_metrics": [list(m) for m in self.pending_metrics],
            "last_eval": dict(self.last_eval),
            "interruption_log": [dict(x) for x in self.interruption_log],
            "rng": {"torch": torch.get_rng_state()},
        }
        if self.scaler is not None:  # only then: an fp32 checkpoint holds what it always held
            sd["scaler"] = self.scaler.state_dict()
        return sd

    def load_model_and_progress(self, sd: dict[str, Any]) -> None:
        """Restore everything but the optimizer, which must first be rebuilt for its stage."""
        self.cursor = Cursor(**sd["cursor"])
        self.model.load_state_dict(sd["model"])
        self.chunk_log = [dict(x) for x in sd["chunk_log"]]
        self.pending_metrics = [(str(k), float(v), int(s)) for k, v, s in sd["pending_metrics"]]
        self.last_eval = dict(sd["last_eval"])
        self.interruption_log = [dict(x) for x in sd.get("interruption_log", [])]
        torch.set_rng_state(sd["rng"]["torch"])
        self.load_scaler(sd)

    def load_scaler(self, sd: dict[str, Any]) -> None:
        """The saved scale and growth tracker, when both this run and the checkpoint use one (the
        precision may change between attempts: a new scaler then starts at its initial scale)."""
        if self.scaler is not None and sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])

    def load_optimizer(self, sd: dict[str, Any]) -> None:
        if sd["optimizer"] is not None and self.optimizer is not None and sd["optimizer_stage"] == self.optimizer_stage:
            self.optimizer.load_state_dict(sd["optimizer"])
            if self.scheduler is not None and sd["scheduler"] is not None:
                self.scheduler.load_state_dict(sd["scheduler"])

    def chunk_entry(self, stage_name: str, chunk: int) -> dict[str, Any] | None:
        for e in self.chunk_log:
            if e["stage"] == stage_name and e["chunk"] == chunk:
                return e
        return None
