"""Exponential-moving-average teacher (Mean Teacher), with warm-up and copied BN buffers."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(decay: float, updates: int) -> float:
    """Warm-up decay min(decay, (1 + n) / (10 + n)) after n previous updates, so that early
    teachers follow the fast-changing student instead of its random initialisation."""
    return min(float(decay), (1.0 + updates) / (10.0 + updates))


class EMATeacher:
    """A frozen copy of a student whose parameters track the student's by EMA.

    Parameters: t <- a t + (1 - a) s with a = `ema_decay_at(decay, n)`; buffers (BatchNorm running
    statistics, counters) are copied from the student, because averaging them is meaningless for
    integer counters and lags for statistics. The teacher runs in eval mode, without gradients.
    """

    def __init__(self, student: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(student)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """One EMA step from `student`; returns the decay used."""
        alpha = ema_decay_at(self.decay, self.updates)
        for t, s in zip(self.module.parameters(), student.parameters()):
            t.mul_(alpha).add_(s.detach().to(t.dtype), alpha=1.0 - alpha)
        for t, s in zip(self.module.buffers(), student.buffers()):
            t.copy_(s)
        self.updates += 1
        return alpha

    def follow_device(self, student: nn.Module) -> None:
        """Move the teacher to the student's device (the engine may move networks after we copy)."""
        ref = next(student.parameters(), None)
        own = next(self.module.parameters(), None)
        if ref is not None and own is not None and own.device != ref.device:
            self.module.to(ref.device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self.module(x)

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
