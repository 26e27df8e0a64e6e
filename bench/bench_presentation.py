"""What presenting a training patch to g costs (`quality.presentation.present_patch`), which QAR and
QW do on every guided step, with g's clip percentiles found by `torch.quantile` (a full sort,
as before) and by `presentation.percentiles` (topk at each end, the same values bit for bit).

    python bench/bench_presentation.py --rounds 20

Random patches of the LA CPU study's sizes (batch 2, 32x64x64, one foreground class) go to g's
default 48^3 grid. The two variants alternate, `--rounds` times, each timing `--steps` calls; the
first round is a warm-up. Prints medians, min-max, their ratio and whether the presented images
are identical.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="calls timed per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patch", type=int, nargs=3, default=(32, 64, 64))
    parser.add_argument("--grid", type=int, nargs=3, default=(48, 48, 48))
    args = parser.parse_args()

    import torch

    from QGSegmentationLib.quality import presentation

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    image = torch.randn(2, 1, *args.patch) * 50 + 200
    probs = torch.rand(2, 1, *args.patch)

    def by_sort(sample, fractions):
        return torch.quantile(sample, torch.tensor(fractions, dtype=sample.dtype), dim=1)

    def call(percentiles):
        presentation.percentiles = percentiles  # standardize_image looks it up at call time
        return presentation.present_patch(image, probs, args.grid)

    fast = presentation.percentiles
    same = torch.equal(call(by_sort)[0], call(fast)[0])
    times = {"torch.quantile": [], "topk": []}
    for round_index in range(args.rounds + 1):
        for name, percentiles in (("torch.quantile", by_sort), ("topk", fast)):
            start = time.perf_counter()
            for _ in range(args.steps):
                call(percentiles)
            if round_index:  # the first round warms up
                times[name].append((time.perf_counter() - start) / args.steps)
    presentation.percentiles = fast
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"present_patch, batch 2, {tuple(args.patch)} -> {tuple(args.grid)}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} calls:")
    for name, t in times.items():
        print(f"  {name}: median {medians[name] * 1000:.2f} ms (min {min(t) * 1000:.2f}, max {max(t) * 1000:.2f})")
    print(f"  topk / torch.quantile: {medians['topk'] / medians['torch.quantile']:.2f}x; presented images identical: {same}")


if __name__ == "__main__":
    main()
