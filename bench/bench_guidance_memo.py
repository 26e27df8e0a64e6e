"""What the guidance work of one guided Mean Teacher step costs, with the unlabeled image that g sees
standardised once (QualityGuidance's memo: QW and QAR are given the same tensor, as the methods
give them) and twice (QAR is given a copy, so the memo cannot apply: the cost before the memo).

    python bench/bench_guidance_memo.py --rounds 40

One step's guidance work: QW's weights of the hard pseudolabel, then the QAR loss and its backward
pass through g into the logits. Random batches of the LA CPU study's sizes (2 unlabeled patches of
32x64x64, two classes) go to a freshly initialised g of the default kind and 48^3 grid (the time
does not depend on its weights). The two variants alternate `--rounds` times after 3 warm-up
rounds. Prints the medians and the time saved per step.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patch", type=int, nargs=3, default=(32, 64, 64))
    args = parser.parse_args()

    import torch

    from QGSegmentationLib.quality.predictor import QualityPredictor, predictor_config
    from QGSegmentationLib.ssl.base import SSLConfig
    from QGSegmentationLib.ssl.guidance import QualityGuidance

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = QualityPredictor(predictor_config(n_foreground=1, mode="3d"))
    guidance = QualityGuidance(g, SSLConfig(guidance_qar=True, guidance_qw=True))

    def step(once: bool) -> float:
        image = torch.randn(2, 1, *args.patch)
        logits = torch.randn(2, 2, *args.patch, requires_grad=True)
        started = time.perf_counter()
        guidance.qw_weights(image, logits.detach().argmax(1), 2)
        guidance.qar_loss(image if once else image.clone(), logits).backward()
        return time.perf_counter() - started

    for _ in range(3):
        step(True), step(False)
    times = {True: [], False: []}
    for _ in range(args.rounds):
        for once in (True, False):
            times[once].append(step(once))
    twice, once = statistics.median(times[False]), statistics.median(times[True])
    print(f"guidance work per step, median of {args.rounds}: standardised twice {twice * 1000:.1f} ms, "
          f"once (memo) {once * 1000:.1f} ms; saved {(twice - once) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
