"""Time `qgseg quality score` on one (image, mask) pair: read both files, crop, run g.

    python bench/bench_score_time.py --checkpoint runs/g/checkpoints/best.pt \\
        --image runs/la16/imagesTr/la_047_E2ZMO66W.nrrd --mask runs/la_sup_a/pred_best/la_047_E2ZMO66W.nrrd

Prints the median, min and max over --repeats runs after one warm-up run (issue 3's bar: a median
of at most 1 s for an LA volume on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help="g's checkpoint; several: their mean, as `qgseg quality score` does")
    parser.add_argument("--image", required=True)
    parser.add_argument("--mask", required=True)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from QGSegmentationLib.quality.predictor import load_predictors
    from QGSegmentationLib.quality.score import score_pair

    torch.set_num_threads(args.threads)
    model = load_predictors(args.checkpoint)
    score_pair(model, args.image, args.mask)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        rows = score_pair(model, args.image, args.mask)
        times.append(time.perf_counter() - start)
    print(f"predicted {[round(r['predicted_quality'], 4) for r in rows]}; {args.repeats} runs on "
          f"{args.threads} threads: median {statistics.median(times):.3f} s, min {min(times):.3f} s, "
          f"max {max(times):.3f} s")


if __name__ == "__main__":
    main()
