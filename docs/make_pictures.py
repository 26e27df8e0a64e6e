"""Render the README's pictures from a finished `qgseg demo` run (synthetic phantom data only).

    python docs/make_pictures.py --demo qgseg_demo --out docs/images

- overlay.png: the demo's overlay of the case g rates worst (prediction filled, reference cyan);
- review_table.png: the panel's Review table as the review model builds it from the demo's
  predicted qualities (worst first, cells coloured against the default thresholds, statuses);
- review_sheet.png: the demo's review.png, the cases g rates worst on three planes each (what
  `qgseg predict` writes beside scores.csv).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def review_table_png(summary: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from QGSegmentationLib.slicer.review import ReviewModel, ReviewRow, Thresholds

    thresholds = Thresholds()
    rows = [ReviewRow(case=c["case"], scores={"organ": c["predicted_quality"]},
                      status="flagged" if thresholds.category(c["predicted_quality"]) == "poor" else "unreviewed")
            for c in summary["cases"] if "predicted_quality" in c]
    model = ReviewModel(rows, thresholds)
    shown = model.rows("all")
    truth = {c["case"]: c.get("true_dice") for c in summary["cases"]}
    cells = [[r.case, f"{r.quality:.3f}", r.status, "" if truth[r.case] is None else f"{truth[r.case]:.3f}"]
             for r in shown]
    colours = [["white", tuple(v / 255 for v in thresholds.color(r.quality)), "white", "#eeeeee"] for r in shown]
    fig, ax = plt.subplots(figsize=(5.6, 0.28 * len(cells) + 0.9), dpi=120)
    ax.axis("off")
    table = ax.table(cellText=cells, cellColours=colours, colLabels=["Case", "Quality", "Status", "true Dice (demo)"],
                     loc="center", cellLoc="left")
    table.scale(1, 1.2)
    ax.set_title(f"Review (worst first) — {model.progress_text()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="qgseg_demo")
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args()
    demo, out = Path(args.demo), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = json.loads((demo / "demo_summary.json").read_text())
    shutil.copyfile(demo / "overlay.png", out / "overlay.png")
    shutil.copyfile(demo / "review.png", out / "review_sheet.png")
    print(review_table_png(summary, out / "review_table.png"))


if __name__ == "__main__":
    main()
