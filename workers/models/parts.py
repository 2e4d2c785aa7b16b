"""Freeze/unfreeze by named part, for multi-stage recipes (`stages[].trainable`)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


class FreezableParts(nn.Module):
    """A model whose parameters are split into named parts (`parts()`), each trainable or frozen.

    A frozen part's batch-norm layers stay in eval mode while the model trains, so its running
    statistics do not drift either. Subclasses define `parts()`; every parameter must belong to
    exactly one part (tests check it per model).
    """

    def parts(self) -> dict[str, nn.Module]:  # pragma: no cover - subclasses define it
        raise NotImplementedError

    @property
    def trainable_parts(self) -> tuple[str, ...]:
        return getattr(self, "_trainable", tuple(self.parts()))

    def set_trainable(self, parts: Iterable[str]) -> None:
        """Train only the named parts ("all" = every part); freeze the rest, BN stats included."""
        names = list(parts)
        all_parts = tuple(self.parts())
        wanted = set(all_parts) if "all" in names else set(names)
        unknown = wanted - set(all_parts)
        if unknown:
            raise ValueError(f"unknown part(s) {sorted(unknown)}; valid: all, {', '.join(all_parts)}")
        self._trainable = tuple(p for p in all_parts if p in wanted)
        for name, module in self.parts().items():
            module.requires_grad_(name in wanted)
        self.train(self.training)

    def train(self, mode: bool = True) -> FreezableParts:
        super().train(mode)
        if mode:
            trainable = self.trainable_parts
            for name, module in self.parts().items():
                if name not in trainable:
                    for m in module.modules():
                        if isinstance(m, nn.modules.batchnorm._BatchNorm):
                            m.eval()
        return self
