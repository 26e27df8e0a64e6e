"""The quality predictor g(image, mask) -> predicted Dice per foreground class.

g sees the image concatenated with K mask channels (K = number of foreground classes; each channel
is that class's foreground probability, or its one-hot indicator for a hard mask) on a fixed grid
(`grid_size`), and answers one number in [0, 1] per class: the Dice it expects that class's mask
to have against the (unknown) reference.

    backbone (registry QUALITY_BACKBONES) -> pooled features (B, F)
    head: Dropout(0.15) -> Linear(F, 256) -> ReLU -> Dropout(0.15) -> Linear(256, K) -> sigmoid

With `segmentation_head` (off by default), g also segments the image itself: a small U-Net on
the image alone predicts the structure on the grid (trained against the presented reference as an
auxiliary loss), its foreground probabilities join the backbone's input, and the soft Dice between
the candidate and that segmentation joins the head's input. The regression then starts from an
explicit estimate of where the reference is, instead of having to infer boundary agreement from
global features of 16-odd training cases; the U-Net sees only the image, so g still judges the
candidate against the image and not against itself.

The backbone "convnet" (default) is a small strided CNN that scores a 48^3 grid in tens of
milliseconds on a CPU; MONAI ResNet-18/34, DenseNet-121 and EfficientNet-B0 are available for GPU
training (all from scratch: no pretrained weights are downloaded, and 3D has none anyway).

Inputs of any spatial size are accepted by `forward`: when they differ from the grid they are
resized with `presentation.resize_to_grid` (differentiable, so QAR can back-propagate through g
into the segmenter). Whole volumes should first go through `presentation.present`, which crops
around the candidate mask; see that module for why.

Checkpoints (`save_predictor` / `load_predictor`) hold only a state dict and plain-dict config, so
they load with `torch.load(weights_only=True)`. An ensemble file (`save_ensemble`) holds several
such predictors; `load_predictor` answers it with a `QualityEnsemble`, so scoring, evaluation and
QAR/QW guidance take one path either way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..fileio import atomic_path
from ..registry import Registry

FORMAT = "qgseg-quality-predictor"
ENSEMBLE_FORMAT = "qgseg-quality-ensemble"
TRAIN_FORMAT = "qgseg-quality-train-state"
FORMAT_VERSION = 1

DEFAULT_GRID = {3: (48, 48, 48), 2: (128, 128)}
HEAD_HIDDEN = 256
HEAD_DROPOUT = 0.15

QUALITY_BACKBONES = Registry("quality backbone")


def _conv(spatial_dims: int):
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _norm(spatial_dims: int):
    # Batch norm, not instance/group norm: per-sample normalisation would erase the difference
    # between an empty and a full mask channel (both become constant), which g must see.
    return nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d


class SmallConvNet(nn.Module):
    """Strided CNN: a stride-2 stem then `levels` stride-2 stages of two convs, each doubling the
    width (capped at `max_width`), then global average pooling. ~0.8M parameters in 3D at width
    16; about 0.1 s per 48^3 volume on one CPU core."""

    def __init__(self, spatial_dims: int, in_channels: int, width: int = 16, levels: int = 3,
                 max_width: int = 128):
        super().__init__()
        conv, norm = _conv(spatial_dims), _norm(spatial_dims)

        def block(cin, cout, stride):
            return [conv(cin, cout, 3, stride=stride, padding=1, bias=False), norm(cout),
                    nn.LeakyReLU(0.1, inplace=True)]

        layers = block(in_channels, width, 2)  # stride-2 stem: full-resolution convs dominate cost
        channels = width
        for _ in range(levels):
            out = min(channels * 2, max_width)
            layers += block(channels, out, 2) + block(out, out, 1)
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1) if spatial_dims == 3 else nn.AdaptiveAvgPool2d(1)
        self.out_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


@QUALITY_BACKBONES.register("convnet", description="small strided CNN (default; CPU-friendly)")
def _convnet(spatial_dims: int, in_channels: int, width: int = 16, levels: int = 3,
             max_width: int = 128):
    net = SmallConvNet(spatial_dims, in_channels, width=width, levels=levels, max_width=max_width)
    return net, net.out_features


def _monai_resnet(factory_name: str):
    def build(spatial_dims: int, in_channels: int, **options):
        from monai.networks import nets

        net = getattr(nets, factory_name)(pretrained=False, spatial_dims=spatial_dims,
                                          n_input_channels=in_channels, feed_forward=False,
                                          **options)
        width = net.layer4[-1].conv2.out_channels if hasattr(net.layer4[-1], "conv2") else 512
        return net, int(width)

    return build


QUALITY_BACKBONES.register("resnet18", description="MONAI ResNet-18 (the paper's backbone)")(
    _monai_resnet("resnet18"))
QUALITY_BACKBONES.register("resnet34", description="MONAI ResNet-34")(_monai_resnet("resnet34"))


class _PooledDenseNet(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.class_layers[:-1](self.net.features(x))  # relu, pool, flatten


@QUALITY_BACKBONES.register("densenet121", description="MONAI DenseNet-121")
def _densenet121(spatial_dims: int, in_channels: int, **options):
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1,
                      pretrained=False, **options)
    width = net.class_layers.out.in_features
    return _PooledDenseNet(net), int(width)


@QUALITY_BACKBONES.register("efficientnet-b0", description="MONAI EfficientNet-B0")
def _efficientnet_b0(spatial_dims: int, in_channels: int, **options):
    from monai.networks.nets import EfficientNetBN

    net = EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=spatial_dims,
                         in_channels=in_channels, num_classes=1, **options)
    width = net._fc.in_features
    net._fc = nn.Identity()
    net._dropout = nn.Identity()
    return net, int(width)


def predictor_config(n_foreground: int = 1, mode: str = "3d", backbone: str = "convnet",
                     grid_size: Sequence[int] | None = None, backbone_options: Mapping | None = None,
                     class_names: Sequence[str] | None = None, segmentation_head: bool = False,
                     **extra: Any) -> Dict[str, Any]:
    """The plain-dict configuration a QualityPredictor is built from (and saved with)."""
    extra.pop("spatial_dims", None)  # derived from mode
    if mode not in ("2d", "3d"):
        raise ConfigError(f"quality predictor mode must be '2d' or '3d', not {mode!r}")
    dims = 3 if mode == "3d" else 2
    grid = tuple(int(g) for g in (grid_size or DEFAULT_GRID[dims]))
    if len(grid) != dims or min(grid) < 8:
        raise ConfigError(f"grid_size {list(grid)} must have {dims} entries, each >= 8, for mode {mode}")
    if int(n_foreground) < 1:
        raise ConfigError("a quality predictor needs at least one foreground class")
    QUALITY_BACKBONES.entry(backbone)  # fail early on unknown names
    names = list(class_names) if class_names else [f"label_{i + 1}" for i in range(int(n_foreground))]
    if len(names) != int(n_foreground):
        raise ConfigError(f"{len(names)} class names given for {n_foreground} foreground classes")
    return {"backbone": str(backbone).lower(), "mode": mode, "spatial_dims": dims,
            "grid_size": list(grid), "n_foreground": int(n_foreground),
            "backbone_options": dict(backbone_options or {}), "class_names": names,
            "segmentation_head": bool(segmentation_head), **extra}


class QualityPredictor(nn.Module):
    """g: (image (B,1,*sp), mask (B,K,*sp)) -> (B,K) predicted Dice in [0, 1]."""

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__()
        self.config = predictor_config(**{**dict(config or {}), **kwargs}) if (config or kwargs) \
            else predictor_config()
        cfg = self.config
        self.spatial_dims = cfg["spatial_dims"]
        self.n_foreground = cfg["n_foreground"]
        self.grid_size = tuple(cfg["grid_size"])
        build = QUALITY_BACKBONES.get(cfg["backbone"])
        self.segmenter = _segmentation_head(self.spatial_dims, self.n_foreground) \
            if cfg.get("segmentation_head") else None
        extra_inputs = self.n_foreground if self.segmenter is not None else 0
        self.backbone, width = build(self.spatial_dims, 1 + self.n_foreground + extra_inputs,
                                     **cfg["backbone_options"])
        self.head = nn.Sequential(
            nn.Dropout(HEAD_DROPOUT), nn.Linear(width + extra_inputs, HEAD_HIDDEN), nn.ReLU(inplace=True),
            nn.Dropout(HEAD_DROPOUT), nn.Linear(HEAD_HIDDEN, self.n_foreground))
        # per-class shift fitted after training on real validation masks (quality.calibrate); 0 = none
        self.register_buffer("output_shift", torch.zeros(self.n_foreground))

    def check_inputs(self, image: torch.Tensor, mask: torch.Tensor) -> None:
        nd = self.spatial_dims + 2
        if image.ndim != nd or image.shape[1] != 1:
            raise ConfigError(f"quality predictor expects an image of shape (B, 1, {'z, y, x' if nd == 5 else 'y, x'}),"
                              f" got {tuple(image.shape)}")
        if mask.ndim != nd or mask.shape[1] != self.n_foreground:
            raise ConfigError(
                f"quality predictor expects a mask of shape (B, {self.n_foreground}, ...) (one channel per "
                f"foreground class), got {tuple(mask.shape)}; use presentation.foreground_channels(probs) "
                "for softmax outputs or presentation.label_to_channels(label, n_classes) for label maps")
        if image.shape[0] != mask.shape[0] or image.shape[2:] != mask.shape[2:]:
            raise ConfigError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} differ in batch or "
                              "spatial size")

    def logits_and_segmentation(self, image: torch.Tensor, mask: torch.Tensor):
        """(Dice logits (B,K), segmentation logits (B,K+1,*grid) or None without a head)."""
        self.check_inputs(image, mask)
        if tuple(image.shape[2:]) != self.grid_size:
            from .presentation import resize_to_grid

            image = resize_to_grid(image, self.grid_size)
            mask = resize_to_grid(mask, self.grid_size)
        mask = mask.to(image.dtype)
        if self.segmenter is None:
            return self.head(self.backbone(torch.cat([image, mask], dim=1))), None
        segmentation = self.segmenter(image)
        estimate = torch.softmax(segmentation.float(), dim=1)[:, 1:].to(image.dtype)
        agreement = soft_dice(mask, estimate)
        features = self.backbone(torch.cat([image, mask, estimate], dim=1))
        return self.head(torch.cat([features, agreement.to(features.dtype)], dim=1)), segmentation

    def logits(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.logits_and_segmentation(image, mask)[0]

    def forward(self, image: torch.Tensor, mask: torch.Tensor, with_segmentation: bool = False):
        """Predicted Dice (B,K); with `with_segmentation`, also the segmentation head's logits
        (None without a head) - training calls it so through the DDP wrapper."""
        logits, segmentation = self.logits_and_segmentation(image, mask)
        # a zero shift leaves the sigmoid and its gradient unchanged: no branch, no device sync
        dice = (torch.sigmoid(logits) + self.output_shift.to(logits.dtype)).clamp(0.0, 1.0)
        return (dice, segmentation) if with_segmentation else dice


def soft_dice(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample, per-channel soft Dice of two (B, K, *spatial) maps -> (B, K); both empty -> 1."""
    dims = tuple(range(2, a.ndim))
    a, b = a.float(), b.float()
    return (2 * (a * b).sum(dims) + eps) / (a.sum(dims) + b.sum(dims) + eps)


def _segmentation_head(spatial_dims: int, n_foreground: int) -> nn.Module:
    """The image-only U-Net of g's optional segmentation head (16-128 channels, 3 poolings)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=spatial_dims, in_channels=1, out_channels=n_foreground + 1,
                channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1, norm="batch")


# ------------------------------------------------------------------------------- save / load

def save_predictor(path: str | os.PathLike, model: QualityPredictor, meta: Mapping | None = None) -> Path:
    """Atomically write a predictor file loadable with `torch.load(weights_only=True)`."""
    state = {"format": FORMAT, "format_version": FORMAT_VERSION,
             "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "config": dict(model.config), "meta": dict(meta or {})}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    return Path(path)


def read_predictor_file(path: str | os.PathLike) -> Dict[str, Any]:
    """The raw dict of a predictor file or of a training state file (which also holds one)."""
    from ..engine.checkpoint import format_of, read_torch_file

    path = Path(path)
    state = read_torch_file(path, "quality predictor checkpoint")
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, TRAIN_FORMAT, ENSEMBLE_FORMAT):
        raise DataError(f"{path}: expected a quality predictor checkpoint ({FORMAT}), found {format_of(state)!r}",
                        hint="pass checkpoints/best.pt of a `qgseg quality train` run folder")
    return state


def load_predictor(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild a predictor from `save_predictor`'s file (or a training state), in eval mode, with
    the file's `meta` dict attached as `model.meta`; an ensemble file gives a QualityEnsemble."""
    state = read_predictor_file(path)
    if state["format"] == ENSEMBLE_FORMAT:
        members = [_predictor_from_state(member, f"{path} (member {i})") for i, member in enumerate(state["members"])]
        return QualityEnsemble(members).to(device).eval()
    return _predictor_from_state(state, path).to(device).eval()


def _predictor_from_state(state: Mapping[str, Any], source) -> QualityPredictor:
    model = QualityPredictor(state["config"])
    weights = dict(state["state_dict"])
    weights.setdefault("output_shift", torch.zeros(model.n_foreground))  # files from before calibration
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise DataError(f"{source}: weights do not fit the saved configuration ({str(exc)[:200]})") from None
    model.meta = dict(state.get("meta") or {})
    return model.eval()


class QualityEnsemble(nn.Module):
    """Several quality predictors of one task answering as one: the mean of their (calibrated)
    predictions. Seeds of g disagree most on unusual volumes (BENCHMARKS.md §2d); averaging them
    removes that variance for one forward pass per member. Exposes what scoring and evaluation
    read from a predictor (n_foreground, grid_size, spatial_dims, config, meta)."""

    def __init__(self, members: Sequence[QualityPredictor]):
        super().__init__()
        if not members:
            raise ConfigError("a quality ensemble needs at least one predictor")
        first = members[0]
        self.members = nn.ModuleList(members)
        self.config, self.n_foreground = dict(first.config), first.n_foreground
        self.grid_size, self.spatial_dims = first.grid_size, first.spatial_dims
        self.meta = {"members": [getattr(m, "meta", {}) for m in members]}

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(image, mask) for member in self.members]).mean(0)


def load_predictors(paths: Sequence[str | os.PathLike], device: str | torch.device = "cpu"):
    """One predictor file -> `load_predictor`; several (or ensemble files among them) -> one
    QualityEnsemble of all their predictors, which must agree on mode, grid and classes (the file
    that does not is named)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if len(paths) == 1:
        return load_predictor(paths[0], device)
    members, sources = [], []
    for path in paths:
        found = members_of(load_predictor(path, device))
        members += found
        sources += [path] * len(found)
    check_compatible(members, sources)
    return QualityEnsemble(members).to(device).eval()


def members_of(model) -> List[QualityPredictor]:
    """The predictors a loaded model averages: an ensemble's members, or the model itself."""
    return list(model.members) if isinstance(model, QualityEnsemble) else [model]


def check_compatible(models: Sequence[QualityPredictor], sources: Sequence) -> None:
    """Predictors averaged together must share mode, grid and classes; raises naming the odd one."""
    key = lambda m: (m.config["mode"], tuple(m.grid_size), m.n_foreground)  # noqa: E731
    for source, model in zip(sources[1:], models[1:]):
        if key(model) != key(models[0]):
            raise ConfigError(f"{source}: cannot be averaged with {sources[0]}: mode/grid/classes "
                              f"{key(model)} differ from {key(models[0])}")


def check_scores_labels(model, labels: Mapping[Any, str], source, scored: str) -> Optional[str]:
    """g (`model`, from `source`) must score the foreground classes of `labels` (a segmenter's or
    a dataset's label values -> names, background included): ConfigError when it was trained for
    another number of classes, before anything is segmented or trained. Returns a warning when the
    class names differ (another dataset, or names spelled differently), else None."""
    foreground = [name for value, name in sorted(((int(k), v) for k, v in labels.items())) if value != 0]
    if model.n_foreground != len(foreground):
        raise ConfigError(f"{source}: this quality predictor scores {model.n_foreground} foreground class(es), "
                          f"but {scored} has {len(foreground)} ({', '.join(foreground)})",
                          hint="use a quality predictor trained on the same labels (qgseg quality train "
                               "on the segmenter's dataset)")
    names = list(model.config.get("class_names") or [])
    unnamed = all(name == f"label_{i + 1}" for i, name in enumerate(names))
    if names and not unnamed and names != foreground:
        return (f"{source}: the quality predictor's classes are named {names}, {scored}'s {foreground}; "
                "scores are matched by label value")
    return None


def save_ensemble(path: str | os.PathLike, models: Sequence[QualityPredictor],
                  sources: Sequence[str | os.PathLike] = ()) -> Path:
    """Atomically write one file holding `models` (e.g. `members_of(load_predictors(files))` of g
    trained with several seeds, BENCHMARKS.md §2d), which `load_predictor` answers with their mean."""
    state = {"format": ENSEMBLE_FORMAT, "format_version": FORMAT_VERSION,
             "members": [{"state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()},
                          "config": dict(m.config), "meta": dict(m.meta)} for m in models],
             "sources": [str(p) for p in sources]}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    return Path(path)
