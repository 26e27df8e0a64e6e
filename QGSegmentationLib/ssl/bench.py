"""Measure what quality guidance costs per training step (target: guided <= 1.15 x host).

    from QGSegmentationLib.ssl.bench import bench_step_overhead
    bench_step_overhead("mt", lambda: [build_network("unet", 3, 1, 2)], g, labeled, unlabeled)

The host step runs the method without guidance; the guided step runs it with QAR and QW both on
and their ramps already at full weight (so g really runs). Both include backward, the optimizer
step and `after_optimizer_step`, on whatever device the tensors and networks are on.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .base import StepInfo
from .config import SSLConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(method, optimizers, labeled: dict, unlabeled: Optional[dict], steps: int, warmup: int) -> float:
    """Mean seconds of one full training step (after `warmup` untimed steps)."""
    device = labeled["image"].device
    total = 0.0
    for i in range(warmup + steps):
        step = StepInfo(iteration=i, total_iterations=warmup + steps, iterations_per_epoch=1)
        _sync(device)
        start = time.perf_counter()
        out = method.training_step(labeled, unlabeled if method.uses_unlabeled else None, step)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        for opt in optimizers:
            opt.step()
        method.after_optimizer_step(step)
        _sync(device)
        if i >= warmup:
            total += time.perf_counter() - start
    return total / max(1, steps)


def bench_step_overhead(method_name: str, make_networks: Callable[[], List[nn.Module]],
                        predictor: nn.Module, labeled: dict, unlabeled: dict,
                        config: Optional[SSLConfig] = None, steps: int = 5, warmup: int = 2,
                        lr: float = 1e-4) -> Dict[str, float]:
    """{"host_s", "guided_s", "ratio"}: mean step time without and with QAR + QW."""
    from .guidance import QualityGuidance
    from .methods import build_method

    base = config or SSLConfig()
    host_cfg = dataclasses.replace(base, guidance_qar=False, guidance_qw=False)
    guided_cfg = dataclasses.replace(base, guidance_qar=True, guidance_qw=True, qar_delay_epochs=0,
                                     qar_rampup_epochs=0, qw_delay_epochs=0, qw_rampup_epochs=0)
    if method_name == "sup":
        guided_cfg = dataclasses.replace(guided_cfg, guidance_qw=False)
    times = {}
    for key, cfg in (("host_s", host_cfg), ("guided_s", guided_cfg)):
        networks = make_networks()
        guidance = QualityGuidance(predictor, cfg) if (cfg.guidance_qar or cfg.guidance_qw) else None
        method = build_method(method_name, networks, cfg, guidance)
        optimizers = [torch.optim.AdamW(n.parameters(), lr=lr) for n in networks]
        times[key] = time_steps(method, optimizers, labeled, unlabeled, steps, warmup)
    times["ratio"] = times["guided_s"] / max(times["host_s"], 1e-12)
    return times
