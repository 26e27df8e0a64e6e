"""Quality guidance (QG-SSL): a frozen quality predictor g steers any semi-supervised method.

g(image (B,1,*sp), mask (B,K,*sp)) -> (B,K) predicted Dice per foreground class, K = n_classes - 1.
- QAR (quality-aware regularisation): L_qar = 1 - mean g(x_u, softmax(f(x_u))[:, 1:]). g stays in
  eval mode with frozen parameters, but the loss is differentiable through g into the segmenter.
- QW (quality-weighted pseudolabels): per-class weights q^T * 1[q >= tau] of the hard pseudolabel,
  computed without gradient. Per sample, the weight is the mean over the foreground classes present
  in that pseudolabel (all K classes when it has no foreground: g still judges an empty mask).
  L = sum_b w_b l_b / (sum_b w_b + 1e-8); all-zero weights give exactly 0.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .config import ssl_config_of
from .losses import one_hot
from .ramps import delayed_linear


class QualityGuidance:
    """Wraps a trained quality predictor g for QAR and QW; one instance per training run."""

    def __init__(self, predictor: nn.Module, config=None):
        self.predictor = predictor
        self.cfg = ssl_config_of(config)
        self._image_memo = None  # (image, (version, grid), presented image): see _presented_image
        self.predictor.eval()
        for p in self.predictor.parameters():
            p.requires_grad_(False)

    def to(self, device) -> "QualityGuidance":
        self.predictor.to(device)
        return self

    # --- schedules (epochs) ------------------------------------------------------------------
    def lambda_qar(self, epoch: float) -> float:
        """0 for `qar_delay_epochs`, then linear over `qar_rampup_epochs` to `qar_weight`."""
        c = self.cfg
        return delayed_linear(epoch, c.qar_delay_epochs, c.qar_rampup_epochs, c.qar_weight)

    def lambda_qw(self, epoch: float) -> float:
        """0 for `qw_delay_epochs`, then linear over `qw_rampup_epochs` to `qw_weight`."""
        c = self.cfg
        return delayed_linear(epoch, c.qw_delay_epochs, c.qw_rampup_epochs, c.qw_weight)

    # --- g -------------------------------------------------------------------------------------
    def quality(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """g(image, masks) as (B, K), with g forced to eval mode and its output shape checked.

        A quality predictor sees each patch as it was trained to (`quality.presentation.present_patch`):
        resized to its grid, the image standardised there (robust z-score); the segmenter's own
        intensity normalisation (volume z-score, [0, 1] percentiles, raw values) would be inputs g
        never saw. A predictor that declares no grid (a plain function of image and masks) gets
        them as they are."""
        if self.predictor.training:
            self.predictor.eval()
        try:
            q = self.predictor(*self._presented(image, masks))
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise
            raise ConfigError(f"quality predictor failed on an image {tuple(image.shape)} with a "
                              f"{masks.shape[1]}-channel mask (was it trained for "
                              f"{masks.shape[1] + 1} classes?): {exc}") from exc
        if q.ndim == 1 and masks.shape[1] == 1:
            q = q[:, None]
        if tuple(q.shape) != (image.shape[0], masks.shape[1]):
            raise ConfigError(f"quality predictor returned shape {tuple(q.shape)}, expected "
                              f"{(image.shape[0], masks.shape[1])} (batch, foreground classes): was "
                              "it trained for this number of classes?")
        return q.float()

    def _presented(self, image: torch.Tensor, masks: torch.Tensor):
        """(image, masks) as g takes them: see `quality`. Shapes are checked before resizing."""
        from ..quality.presentation import resize_to_grid

        grid = getattr(self.predictor, "grid_size", None)
        if grid is None:
            return image, masks
        check = getattr(self.predictor, "check_inputs", None)
        if check is not None:
            check(image, masks)
        return self._presented_image(image, tuple(grid)), resize_to_grid(masks, grid)

    def _presented_image(self, image: torch.Tensor, grid: tuple) -> torch.Tensor:
        """`present_patch_image(image, grid)`, remembered for the last image: QW and QAR judge the
        same unlabeled batch in one step, and standardising it is a few percent of a guided step.
        The memo holds the tensor itself, so `is` cannot match a new tensor at a reused address,
        and its version counter, so an image changed in place is presented again."""
        from ..quality.presentation import present_patch_image

        if image.is_inference():  # no version counter to check
            return present_patch_image(image, grid)
        key = (image._version, grid)
        memo = self._image_memo
        if memo is not None and memo[0] is image and memo[1] == key:
            return memo[2]
        shown = present_patch_image(image, grid)
        self._image_memo = (image, key, shown)
        return shown

    def qar_loss(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """1 - mean g(x, softmax(logits)[:, 1:]); gradients reach the segmenter through g."""
        probs = torch.softmax(logits.float(), dim=1)[:, 1:]
        return 1.0 - self.quality(image, probs).mean()

    @torch.no_grad()
    def qw_weights(self, image: torch.Tensor, hard_labels: torch.Tensor, n_classes: int | None = None) -> torch.Tensor:
        """(B,) weights of hard pseudolabels (B, *sp) int: mean over present foreground classes of
        q_c^T * 1[q_c >= tau]. `n_classes` defaults to max(2, largest label + 1); multi-class
        callers pass the segmenter's channel count (a pseudolabel may miss the last class)."""
        if n_classes is None:
            n_classes = max(2, int(hard_labels.max().item()) + 1)
        masks = one_hot(hard_labels, n_classes, image.dtype)[:, 1:]
        q = self.quality(image, masks)
        return self.weights_from_quality(q, masks)

    def weights_from_quality(self, q: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) qualities -> (B,) sample weights (see the module docstring)."""
        per_class = q.clamp_min(0.0) ** self.cfg.qw_temperature * (q >= self.cfg.qw_tau).to(q.dtype)
        if masks is None:
            return per_class.mean(dim=1)
        present = (masks.reshape(masks.shape[0], masks.shape[1], -1).sum(-1) > 0).to(q.dtype)
        none_present = present.sum(dim=1, keepdim=True) == 0
        present = torch.where(none_present, torch.ones_like(present), present)
        return (per_class * present).sum(dim=1) / present.sum(dim=1)

    @staticmethod
    def weighted_mean(per_sample_losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum w l / (sum w + 1e-8): exactly 0 (with a defined gradient) when all weights are 0."""
        weights = weights.detach().to(per_sample_losses.dtype)
        return (weights * per_sample_losses).sum() / (weights.sum() + 1e-8)
