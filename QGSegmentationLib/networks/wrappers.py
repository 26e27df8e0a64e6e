"""Small nn.Module adapters that make every registered network return one logits tensor.

Imported only by the builders (it imports torch), never at package import."""

from __future__ import annotations

import torch
from torch import nn


class LastOutput(nn.Module):
    """Wraps a network returning a list of outputs (deep supervision, UNet++) and returns only
    the last (full-resolution, deepest-decoder) output, in training and in evaluation."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, (list, tuple)):
            return out[-1]
        return out
