"""A trained segmenter loaded from a checkpoint: networks + preprocessing + label names.

`load_segmenter(path)` rebuilds exactly what training used (network names and options, mode,
patch size, preprocessing) from the checkpoint, so inference needs nothing but the file. Methods
with two networks (CPS, dual-network) are evaluated as the average of their softmaxes, and so
are several checkpoints given together (`ensemble_segmenters`: e.g. best and last, or several seeds).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch

from .engine.checkpoint import load_checkpoint
from .errors import ConfigError


class SoftmaxEnsemble(torch.nn.Module):
    """Averages the softmax of several networks; returns log-probabilities (softmax-compatible)."""

    def __init__(self, networks: List[torch.nn.Module]):
        super().__init__()
        self.networks = torch.nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.networks) == 1:
            return self.networks[0](x)
        probs = torch.stack([torch.softmax(n(x).float(), dim=1) for n in self.networks]).mean(0)
        return torch.log(probs.clamp_min(1e-8))


class MirroredEnsemble(torch.nn.Module):
    """Test-time mirroring: averages the softmax of `network` over every combination of flips of
    the window's spatial axes (2^d passes: 8 in 3D, 4 in 2D), each flipped back before averaging;
    returns log-probabilities like SoftmaxEnsemble. Costs 2^d times the inference time."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(2, x.ndim))
        total = None
        combos = [c for r in range(len(spatial) + 1) for c in itertools.combinations(spatial, r)]
        for axes in combos:
            out = self.network(torch.flip(x, axes) if axes else x)
            probs = torch.softmax(out.float(), dim=1)
            probs = torch.flip(probs, axes) if axes else probs
            total = probs if total is None else total + probs
        return torch.log((total / len(combos)).clamp_min(1e-8))


@dataclass
class Segmenter:
    network: torch.nn.Module
    n_classes: int
    labels: Dict[int, str]
    mode: str
    patch_size: tuple
    preprocessor: object
    config: dict
    path: Path

    def mirrored(self) -> "Segmenter":
        """The same segmenter with test-time mirroring (see MirroredEnsemble)."""
        return dataclasses.replace(self, network=MirroredEnsemble(self.network).eval())

    @property
    def foreground_names(self) -> Dict[int, str]:
        return {k: v for k, v in self.labels.items() if k != 0}


def load_segmenter(path: str | Path, device="cpu") -> Segmenter:
    from .data.preprocess import UNRECORDED_LABEL_RESAMPLING, PreprocessConfig, Preprocessor
    from .networks import build_network, member_options

    state = load_checkpoint(path, map_location=device)
    cfg = state["config"]
    dims = 2 if state["mode"] == "2d" else 3
    nets = []
    for index in state["inference_networks"]:
        name = state["network_names"][index]
        options = member_options(name, cfg["network"], cfg["network_options"], state["patch_size"],
                                 cfg.get("other_network_options"))
        net = build_network(name, dims, 1, state["n_classes"], **options)
        net.load_state_dict(state["networks"][index])
        nets.append(net.to(device).eval())
    pre = {"label_resampling": UNRECORDED_LABEL_RESAMPLING, **state["preprocess"]}
    if pre.get("target_spacing") is not None:
        pre["target_spacing"] = tuple(pre["target_spacing"])
    if pre.get("clip_percentiles") is not None:
        pre["clip_percentiles"] = tuple(pre["clip_percentiles"])
    preprocessor = Preprocessor(PreprocessConfig(**pre))
    labels = {int(k): v for k, v in state["labels"].items()}
    return Segmenter(SoftmaxEnsemble(nets).eval(), int(state["n_classes"]), labels, state["mode"],
                     tuple(state["patch_size"]), preprocessor, cfg, Path(path))


def ensemble_segmenters(segmenters: List[Segmenter]) -> Segmenter:
    """One segmenter averaging the softmax of `segmenters` (checkpoints of the same task: same
    mode, labels and preprocessing; the first one's window size is used)."""
    first = segmenters[0]
    for other in segmenters[1:]:
        for what, mine, theirs in (("mode", first.mode, other.mode), ("labels", first.labels, other.labels),
                                   ("preprocessing", first.preprocessor.config, other.preprocessor.config)):
            if mine != theirs:
                raise ConfigError(f"{other.path}: cannot be ensembled with {first.path}: its {what} "
                                  f"differs ({theirs} vs {mine})")
    if len(segmenters) == 1:
        return first
    network = SoftmaxEnsemble([s.network for s in segmenters]).eval()
    return dataclasses.replace(first, network=network)
