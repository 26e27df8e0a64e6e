"""Figures of the quality predictor: calibration scatter and training curve (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from ..fileio import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    plt = _pyplot()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out)


MAX_COLOURED_GROUPS = 10


def calibration_scatter(predicted: Sequence[float], true: Sequence[float], out: str | Path,
                        title: str = "", groups: Sequence[str] | None = None) -> Path:
    """Predicted vs true Dice with the identity line; MAE and Pearson r in the title.

    With `groups` (one name per point, e.g. the segmenter that made each mask) and 2 to
    MAX_COLOURED_GROUPS of them, each group gets its own colour and legend entry, so a cloud that
    is well ordered overall but flat within one segmenter shows."""
    plt = _pyplot()
    p, t = np.asarray(predicted, float).ravel(), np.asarray(true, float).ravel()
    mae = float(np.abs(p - t).mean()) if p.size else float("nan")
    r = float(np.corrcoef(p, t)[0, 1]) if p.size > 1 and p.std() > 0 and t.std() > 0 else float("nan")
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=110)
    ax.plot([0, 1], [0, 1], "--", color="0.5", lw=1, label="ideal")
    names = list(dict.fromkeys(groups)) if groups is not None else []
    if 2 <= len(names) <= MAX_COLOURED_GROUPS:
        labels = np.asarray(groups)
        for index, name in enumerate(names):
            chosen = labels == name
            ax.scatter(t[chosen], p[chosen], s=10, alpha=0.7, color=f"C{index}", edgecolors="none",
                       label=Path(name).name or name)
        ax.legend(fontsize=6, loc="lower right", markerscale=1.5)
    else:
        ax.scatter(t, p, s=10, alpha=0.6, color="tab:blue", edgecolors="none")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("true Dice")
    ax.set_ylabel("predicted Dice")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.set_title(f"{title + chr(10) if title else ''}MAE {mae:.3f}, r {r:.3f} (n={p.size})", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def training_curve(history: List[Dict[str, Any]], out: str | Path, title: str = "quality predictor") -> Path:
    """Training loss and validation MAE per epoch (left axis), validation Pearson (right axis)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    loss = [np.nan if h.get("train_loss") is None else h["train_loss"] for h in history]
    ax.plot(epochs, loss, "s--", color="tab:red", label="training loss")
    ax.plot(epochs, [h["val_mae"] for h in history], "o-", color="tab:blue", label="validation MAE")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss / MAE")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_pearson"] for h in history], "^-", color="tab:green", label="validation r")
    ax2.set_ylabel("validation Pearson r", color="tab:green")
    ax2.set_ylim(-1, 1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out)


def member_curves(histories: Dict[str, List[Dict[str, Any]]], out: str | Path,
                  title: str = "quality predictor ensemble") -> Path:
    """Validation MAE (left) and Pearson r (right) per epoch of each ensemble member, the best
    epoch of each (lowest MAE) marked."""
    plt = _pyplot()
    fig, (mae_ax, r_ax) = plt.subplots(1, 2, figsize=(8, 3.5), dpi=110)
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        maes = [h["val_mae"] for h in history]
        line, = mae_ax.plot(epochs, maes, "-", lw=1.2, label=name)
        r_ax.plot(epochs, [h["val_pearson"] for h in history], "-", lw=1.2, color=line.get_color())
        if maes:
            best = int(np.nanargmin(maes))
            mae_ax.plot(epochs[best], maes[best], "o", color=line.get_color())
    mae_ax.set(xlabel="epoch", ylabel="validation MAE")
    r_ax.set(xlabel="epoch", ylabel="validation Pearson r", ylim=(-1, 1))
    for ax in (mae_ax, r_ax):
        ax.grid(alpha=0.3)
    mae_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)
