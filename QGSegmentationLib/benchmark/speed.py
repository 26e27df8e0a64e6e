"""What quality guidance costs per training step, measured side by side in one process.

For each method the study runs with guidance, the method is built twice from the study's own
settings (network, options, patch size, batch sizes, AMP on CUDA) - once as the host method, once
with its guidance switched on and the guidance ramps at full weight from step 0, so that g really
runs every step. Both are fed the same tiny random batches of the configured patch size; a step
is the whole training step (forward, loss, backward, clipping, optimizer, EMA/teacher update).
Host and guided alternate in `rounds` blocks of `warmup` untimed + `steps` timed steps, so slow
drift of a shared machine hits both; the medians of the timed steps and their ratio are reported.

The predictor is the study's trained g when there is one, otherwise a randomly initialised g of
the configured architecture: its speed does not depend on its weights.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .config import BenchConfig, RunSpec


def speed_methods(config: BenchConfig) -> List[RunSpec]:
    """The guided runs to time against their hosts: every guided run of the study, once per label
    (its `train` overrides included), or those of the methods in `speed.methods` (qar+qw for a
    method the study runs without guidance)."""
    guided: Dict[str, RunSpec] = {}
    for run in config.runs:
        if run.guidance:
            guided.setdefault(run.label, run)
    if config.speed.methods is None:
        return list(guided.values())
    picked = []
    for name in config.speed.methods:
        if name == "sup":
            continue
        matches = [run for run in guided.values() if run.method == name]
        picked += matches or [RunSpec(name, ("qar", "qw"))]
    return picked


def _random_batches(train_cfg, n_classes: int, device, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    patch = tuple(train_cfg.patch_size)
    labeled = {"image": torch.randn((train_cfg.batch_size, 1, *patch), generator=gen),
               "label": torch.randint(0, n_classes, (train_cfg.batch_size, *patch), generator=gen)}
    unlabeled = {"image": torch.randn((train_cfg.unlabeled_batch_size, 1, *patch), generator=gen)}
    move = lambda batch: {k: v.to(device) for k, v in batch.items()}  # noqa: E731
    return move(labeled), move(unlabeled)


def _predictor(config: BenchConfig, n_classes: int, device, checkpoint: Optional[str]):
    from ..quality.predictor import QualityPredictor, load_predictor, predictor_config

    if checkpoint:
        return load_predictor(checkpoint, device=device)
    q = config.quality_config(0)
    return QualityPredictor(predictor_config(n_foreground=n_classes - 1, mode=q.mode, backbone=q.backbone,
                                             grid_size=q.grid_size, backbone_options=q.backbone_options)
                            ).to(device).eval()


class _Stepper:
    """One method instance with its networks and optimizers, able to take a full training step."""

    def __init__(self, config: BenchConfig, run: RunSpec, n_classes: int, device, predictor=None, dataset=None):
        import torch

        from ..data.planning import plan_for_dataset
        from ..engine.trainer import _MethodConfig, make_optimizer
        from ..errors import ConfigError
        from ..networks import build_network, member_options
        from ..ssl.base import SSLConfig
        from ..ssl.guidance import QualityGuidance
        from ..ssl.methods import METHODS

        method, guidance = run.method, run.guidance
        self.cfg = config.train_config(run, 0, dataset="speed")
        if self.cfg.patch_size == "auto":  # the patch training would use, planned from the study's data
            if not dataset:
                raise ConfigError(f"{config.where}: the speed test needs a patch_size, or a dataset to plan one from")
            self.cfg.apply_plan(plan_for_dataset(dataset, self.cfg.mode, device.type))
        ssl = dict(self.cfg.ssl)
        if guidance:  # ramps at full weight from the first step so g runs every step
            ssl.update(qar_delay_epochs=0, qar_rampup_epochs=0, qw_delay_epochs=0, qw_rampup_epochs=0)
        ssl_cfg = SSLConfig.from_dict(ssl)
        method_cls = METHODS.get(method)
        method_cfg = _MethodConfig(self.cfg, ssl_cfg)
        names = None
        if getattr(method_cls, "network_names", None) is not None:
            names = method_cls.network_names(method_cfg)
        names = [self.cfg.network if n is None else n for n in names] if names \
            else [self.cfg.network] * int(getattr(method_cls, "num_networks", 1))
        dims = 2 if self.cfg.mode == "2d" else 3
        self.networks = []
        for index, name in enumerate(names):
            torch.manual_seed(index)
            options = member_options(name, self.cfg.network, self.cfg.network_options, self.cfg.patch_size,
                                     self.cfg.other_network_options)
            self.networks.append(build_network(name, dims, 1, n_classes, **options).to(device))
        guide = QualityGuidance(predictor, ssl_cfg) if guidance else None
        self.method = method_cls(self.networks, method_cfg, guide)
        self.optimizers = [make_optimizer(n.parameters(), self.cfg) for n in self.networks]
        self.device = device
        self.amp = device.type == "cuda" and self.cfg.amp != "off"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.iteration = 0

    def step(self, labeled, unlabeled) -> float:
        import torch

        from ..engine.trainer import backward_and_step
        from ..ssl.base import StepInfo

        info = StepInfo(self.iteration, 10**6, 1)
        _sync(self.device)
        start = time.perf_counter()
        for net in self.networks:
            net.train()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            out = self.method.training_step(labeled, unlabeled if self.method.uses_unlabeled else None, info)
        backward_and_step(out["loss"], self.scaler, self.optimizers, self.networks, self.cfg.grad_clip)
        self.method.after_optimizer_step(info)
        _sync(self.device)
        self.iteration += 1
        return time.perf_counter() - start


def measure_speed(config: BenchConfig, runs: Sequence[RunSpec], n_classes: int, device,
                  quality_checkpoint: Optional[str] = None, dataset=None) -> List[Dict[str, Any]]:
    """[{"method", "guidance", "host_step_s", "guided_step_s", "ratio", "host_steps", "guided_steps"}]
    for each guided run against the same run without guidance."""
    sp = config.speed
    predictor = _predictor(config, n_classes, device, quality_checkpoint)
    rows = []
    for run in runs:
        method, guidance = run.name or run.method, run.guidance
        host = _Stepper(config, dataclasses.replace(run, guidance=()), n_classes, device, dataset=dataset)
        guided = _Stepper(config, run, n_classes, device, predictor, dataset=dataset)
        labeled, unlabeled = _random_batches(host.cfg, n_classes, device)
        times: Dict[str, List[float]] = {"host": [], "guided": []}
        for _ in range(int(sp.rounds)):
            for name, stepper in (("host", host), ("guided", guided)):
                for i in range(int(sp.warmup) + int(sp.steps)):
                    seconds = stepper.step(labeled, unlabeled)
                    if i >= int(sp.warmup):
                        times[name].append(seconds)
        host_s, guided_s = float(np.median(times["host"])), float(np.median(times["guided"]))
        rows.append({"method": method, "guidance": list(guidance), "host_step_s": host_s,
                     "guided_step_s": guided_s, "ratio": guided_s / max(host_s, 1e-12),
                     "host_steps": len(times["host"]), "guided_steps": len(times["guided"]),
                     "patch_size": list(host.cfg.patch_size), "batch_size": host.cfg.batch_size,
                     "unlabeled_batch_size": host.cfg.unlabeled_batch_size})
        del host, guided
    return rows


def _sync(device) -> None:
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(device)
