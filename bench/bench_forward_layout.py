"""Time a forward pass of the default 3D UNet on a CPU in the default and the channels-last layout.

    python bench/bench_forward_layout.py --rounds 3

Inference (`qgseg predict`, validation during training) runs forward passes only; training
(BENCHMARKS.md §17) also runs the backward pass, where channels-last gains on a CPU. Each round
builds both variants and times `--steps` forwards of `--batch` 48³ windows under no_grad after 3
warm-up forwards; prints the median per round.
"""

from __future__ import annotations

import argparse
import statistics
import time


def median_forward_ms(channels_last: bool, batch: int, steps: int) -> float:
    import torch

    from QGSegmentationLib.networks import build_network

    torch.manual_seed(0)
    net = build_network("unet", 3, in_channels=1, out_channels=2).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    x = torch.randn(batch, 1, 48, 48, 48)
    times = []
    with torch.no_grad():
        for step in range(3 + steps):
            start = time.perf_counter()
            net(x)
            if step >= 3:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    for batch in args.batches:
        rounds = [(median_forward_ms(False, batch, args.steps), median_forward_ms(True, batch, args.steps))
                  for _ in range(args.rounds)]
        print(f"batch {batch}: default " + ", ".join(f"{a:.1f}" for a, _ in rounds) + " ms | channels-last "
              + ", ".join(f"{b:.1f}" for _, b in rounds) + " ms")


if __name__ == "__main__":
    main()
