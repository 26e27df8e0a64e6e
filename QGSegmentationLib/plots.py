"""Figures people would rather look at than read: training curves, prediction overlays, the
review sheet (the cases rated worst, three planes each) and per-case metrics.

matplotlib with the Agg backend only (no display needed); imported lazily by the callers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: List[Dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Validation Dice and training loss against iteration, one PNG."""
    from .fileio import atomic_path

    plt = _pyplot()
    its = [h["iteration"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(its, [h["val_dice"] for h in history], "o-", color="tab:blue", label="validation Dice")
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation Dice", color="tab:blue")
    ax.set_ylim(0, 1)
    if any("train_loss" in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(its, [h.get("train_loss", np.nan) for h in history], "s--", color="tab:red", label="train loss")
        ax2.set_ylabel("training loss (smoothed)", color="tab:red")
    ax.set_title(title or "training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out)


def member_training_curves(histories: Dict[str, List[Dict[str, Any]]], out: str | Path,
                           title: str = "segmenter ensemble") -> Path:
    """Validation Dice (left) and smoothed training loss (right) against iteration, one line per
    ensemble member, each member's best validation marked."""
    from .fileio import atomic_path

    plt = _pyplot()
    fig, (dice_ax, loss_ax) = plt.subplots(1, 2, figsize=(8, 3.5), dpi=110)
    for name, history in histories.items():
        its, dice = [h["iteration"] for h in history], [h["val_dice"] for h in history]
        line, = dice_ax.plot(its, dice, "o-", ms=3, lw=1.2, label=name)
        loss_ax.plot(its, [h.get("train_loss", np.nan) for h in history], "-", lw=1.2, color=line.get_color())
        if dice:
            best = int(np.nanargmax(dice))
            dice_ax.plot(its[best], dice[best], "*", ms=10, color=line.get_color())
    dice_ax.set(xlabel="iteration", ylabel="validation Dice (* best)", ylim=(0, 1))
    loss_ax.set(xlabel="iteration", ylabel="training loss (smoothed)")
    for ax in (dice_ax, loss_ax):
        ax.grid(alpha=0.3)
    dice_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out)


def overlay_png(image: np.ndarray, label: np.ndarray, out: str | Path, reference: np.ndarray | None = None,
                title: str = "", n_slices: int = 3, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> Path:
    """Axial slices through the label's extent with the prediction filled (and reference contoured)."""
    from .fileio import atomic_path

    plt = _pyplot()
    fg = np.argwhere(label > 0)
    if len(fg):
        z0, z1 = fg[:, 0].min(), fg[:, 0].max()
    else:
        z0, z1 = 0, image.shape[0] - 1
    zs = np.linspace(z0, z1, n_slices + 2)[1:-1].round().astype(int) if z1 > z0 else [z0] * n_slices
    fig, axes = plt.subplots(1, n_slices, figsize=(3.2 * n_slices, 3.4), dpi=110)
    axes = np.atleast_1d(axes)
    lo, hi = np.percentile(image, [1, 99])
    aspect = spacing_zyx[1] / spacing_zyx[2]
    for ax, z in zip(axes, zs):
        ax.imshow(image[z], cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
        masked = np.ma.masked_where(label[z] == 0, label[z])
        ax.imshow(masked, cmap="autumn", alpha=0.45, vmin=0, vmax=max(1, int(label.max())), aspect=aspect)
        if reference is not None and reference[z].any():
            ax.contour(reference[z] > 0, levels=[0.5], colors="cyan", linewidths=1.0)
        ax.set_title(f"slice z={z}", fontsize=9)
        ax.axis("off")
    fig.suptitle(title + ("  (fill: prediction, cyan: reference)" if reference is not None else ""), fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out)


def orthogonal_planes(image: np.ndarray, label: np.ndarray, spacing_zyx: Sequence[float]) -> List[tuple]:
    """(name, image slice, label slice, aspect) for the axial, coronal and sagittal planes through
    the label's centre (the volume's when the label is empty); superior up in the two side views."""
    fg = np.argwhere(label > 0)
    z, y, x = (fg.mean(axis=0) if len(fg) else np.array(image.shape) / 2).round().astype(int)
    sz, sy, sx = spacing_zyx
    return [("axial", image[z], label[z], sy / sx),
            ("coronal", image[:, y, :][::-1], label[:, y, :][::-1], sz / sx),
            ("sagittal", image[:, :, x][::-1], label[:, :, x][::-1], sz / sy)]


def review_sheet(cases: Sequence[Tuple[str, np.ndarray, np.ndarray, Sequence[float]]], out: str | Path,
                 title: str = "") -> Path:
    """One PNG, one row per case in the given order (worst first): the prediction filled on the
    axial, coronal and sagittal planes through its centre. `cases`: (caption, image, label,
    spacing z y x)."""
    from .fileio import atomic_path

    plt = _pyplot()
    fig, axes = plt.subplots(len(cases), 3, figsize=(8.4, 2.7 * len(cases) + 0.4), dpi=90, squeeze=False)
    for row, (caption, image, label, spacing) in zip(axes, cases):
        lo, hi = np.percentile(image, [1, 99])
        for ax, (plane, picture, mask, aspect) in zip(row, orthogonal_planes(image, label, spacing)):
            ax.imshow(picture, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
            ax.imshow(np.ma.masked_where(mask == 0, mask), cmap="autumn", alpha=0.45, vmin=0,
                      vmax=max(1, int(label.max())), aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(plane, fontsize=8)
        row[0].set_ylabel(caption, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title or "worst first", fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out)


def _horizontal() -> Dict[str, Any]:
    """boxplot's keyword for a horizontal box: `orientation` from matplotlib 3.10, `vert` before."""
    import matplotlib

    major, minor = (int(part) for part in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def metrics_figure(rows: Sequence[Dict[str, Any]], out: str | Path, title: str = "", most: int = 3) -> Path:
    """Per-case Dice and HD95 of each class (`dice_<c>`, `hd95_<c>` of `qgseg evaluate`'s rows): a
    box with every case as a dot, the `most` worst cases named."""
    from .fileio import atomic_path

    plt = _pyplot()
    classes = sorted({int(k[5:]) for row in rows for k in row if k.startswith("dice_") and k[5:].isdigit()})
    fig, axes = plt.subplots(len(classes), 2, figsize=(9, 1.2 + 1.6 * len(classes)), dpi=100, squeeze=False)
    jitter = np.random.default_rng(0)
    for row_axes, c in zip(axes, classes):
        for ax, (metric, label, worst_is_low) in zip(row_axes, (("dice", "Dice", True), ("hd95", "HD95 (mm)", False))):
            cases = [(r["case"], float(r[f"{metric}_{c}"])) for r in rows if f"{metric}_{c}" in r]
            values = np.array([v for _, v in cases])
            ax.boxplot(values, widths=0.5, showfliers=False, **_horizontal())
            heights = dict(zip((case for case, _ in cases), 1 + jitter.uniform(-0.15, 0.15, len(values))))
            ax.scatter(values, list(heights.values()), s=12, alpha=0.7, color="tab:blue")
            if metric == "dice" and len(values):
                ax.set_xlim(max(0.0, values.min() - 0.05), 1.0)
            low, high = ax.get_xlim()
            order = sorted(cases, key=lambda item: item[1], reverse=not worst_is_low)[:most]
            for step, (case, value) in enumerate(order):  # staggered, so close values stay readable
                right = value > (low + high) / 2
                ax.annotate(case, (value, heights[case]), xytext=(-4 if right else 4, 16 + 12 * step), textcoords="offset points",
                            fontsize=7, color="tab:red", ha="right" if right else "left",
                            arrowprops={"arrowstyle": "-", "color": "tab:red", "lw": 0.5})
            ax.set_ylim(0.6, 1.9)
            ax.set_yticks([1], [f"class {c}"] if metric == "dice" else [""])
            ax.set_xlabel(label, fontsize=9)
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title or f"{len(rows)} cases (red: the {most} worst)", fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out)
