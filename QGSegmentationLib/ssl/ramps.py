"""Weight schedules, written in epochs (paper units) and evaluated at fractional epochs."""

from __future__ import annotations

import math


def sigmoid_rampup(current: float, length: float) -> float:
    """exp(-5 (1 - t)^2) with t = clip(current / length, 0, 1) (Laine & Aila; Mean Teacher)."""
    if length <= 0:
        return 1.0
    t = min(max(float(current) / float(length), 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(current: float, length: float) -> float:
    """clip(current / length, 0, 1); a zero length means 'already ramped'."""
    if length <= 0:
        return 1.0
    return min(max(float(current) / float(length), 0.0), 1.0)


def delayed_linear(epoch: float, delay: float, length: float, final: float) -> float:
    """0 until `delay` epochs, then linear over `length` epochs up to `final` (QG-SSL's QAR/QW)."""
    if epoch < delay:
        return 0.0
    return float(final) * linear_rampup(epoch - delay, length)


def sigmoid_weight(epoch: float, weight: float, length: float) -> float:
    """weight * sigmoid_rampup(epoch, length): the consistency weight of MT, UA-MT, ICT, CPS."""
    return float(weight) * sigmoid_rampup(epoch, length)
