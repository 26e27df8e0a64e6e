"""Benchmark figures (matplotlib, Agg): test Dice per method with every seed as a point, and the
validation Dice curves of every run overlaid. Written atomically; imported only by the report."""

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
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out)


def dice_per_method(groups: Sequence[Dict[str, Any]], out: str | Path) -> Path:
    """One column per (split, method, guidance) group: each seed's mean test Dice as a point for the
    best-on-validation (filled) and last (hollow) checkpoints, with the mean over seeds as a bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) + 2), 3.8), dpi=110)
    rng = np.random.default_rng(0)
    for x, group in enumerate(groups):
        for offset, which, face in ((-0.15, "best", "tab:blue"), (0.15, "last", "none")):
            values = np.asarray(group["dice"][which], dtype=float)
            if not len(values):
                continue
            jitter = rng.uniform(-0.04, 0.04, len(values)) if len(values) > 1 else np.zeros(1)
            ax.scatter(x + offset + jitter, values, s=28, facecolors=face, edgecolors="tab:blue", zorder=3,
                       label=f"{which} checkpoint" if x == 0 else None)
            ax.hlines(values.mean(), x + offset - 0.1, x + offset + 0.1, colors="black", linewidth=1.5, zorder=4)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g["name"] for g in groups], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test Dice (mean over cases)")
    ax.set_ylim(0, 1)
    ax.set_title("test Dice per method; points = seeds, bars = mean", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if groups:
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out)


def validation_curves(records: List[Dict[str, Any]], out: str | Path) -> Path:
    """Validation Dice against iteration for every run; one colour per method+guidance (and split)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.0), dpi=110)
    names = list(dict.fromkeys(_name(r, records) for r in records))
    colours = plt.get_cmap("tab10")
    for record in records:
        history = [h for h in record.get("history") or [] if h.get("val_dice") is not None]
        if not history:
            continue
        name = _name(record, records)
        index = names.index(name)
        first = record is next(r for r in records if _name(r, records) == name)
        ax.plot([h["iteration"] for h in history], [h["val_dice"] for h in history], "-", marker=".",
                color=colours(index % 10), alpha=0.8, linewidth=1.2, label=name if first else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.set_title("validation Dice during training (one line per seed)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out)


def _name(record: Dict[str, Any], records: List[Dict[str, Any]]) -> str:
    several = len({r.get("split") for r in records}) > 1
    return f"{record['split']}: {record['label']}" if several else record["label"]
