"""Time the training step of `qgseg train` under its precision / memory-format switches.

    python bench/bench_train_step.py --device cuda                        # LA CPU and GPU configs
    python bench/bench_train_step.py --device cpu --configs la_cpu --steps 5 --rounds 1

Each configuration builds the real `Trainer` (the same networks, method, sampler, loss and
optimizer as `qgseg train`) on a synthetic phantom dataset large enough for its patch, once per
variant (`amp` on/off x `channels_last` on/off; on a CPU only the fp32 variant exists). Variants
alternate in `--rounds` blocks of `--warmup` untimed and `--steps` timed steps, so drift of the
machine hits them all; each step ends with a device synchronisation. Prints, per configuration,
the median step time of each variant and its ratio to fp32 / contiguous, and the peak GPU memory.
A variant whose loss turns NaN (`qgseg train` stops such a run) is reported and dropped.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

CONFIGS = {
    # bench/la_cpu.yaml's segmenter (BENCHMARKS §1, §3): UNet 16-128 on 32x64x64 at 1.25 mm
    "la_cpu": dict(network="unet", network_options={"channels": [16, 32, 64, 128]},
                   patch_size=(32, 64, 64), batch_size=2, phantom=(48, 96, 96)),
    # bench/la_gpu.yaml's segmenter: V-Net on 80x112x112 at 0.625 mm
    "la_gpu": dict(network="vnet", network_options={"dropout": 0.5},
                   patch_size=(80, 112, 112), batch_size=2, phantom=(88, 128, 128)),
}
METHODS = ("sup", "mt")


def build_trainer(root, config, method, device, precision, channels_last, unlabeled):
    from QGSegmentationLib.engine.config import TrainConfig
    from QGSegmentationLib.engine.trainer import Trainer

    spec = CONFIGS[config]
    cfg = TrainConfig(dataset=str(unlabeled), network=spec["network"], network_options=spec["network_options"],
                      patch_size=spec["patch_size"], batch_size=spec["batch_size"], unlabeled_batch_size=2,
                      method=method, device=device, amp="off" if precision == "fp32" else "on",
                      amp_dtype="auto" if precision == "fp32" else precision, channels_last=channels_last,
                      iterations=10**6)
    trainer = Trainer(cfg, tempfile.mkdtemp(dir=root), progress_bar=False, resume=False)
    trainer.prepare_data()
    trainer.build()
    trainer.load_unlabeled()
    trainer.make_samplers()
    return trainer


def timed_steps(trainer, n, sync):
    from QGSegmentationLib.ssl.base import StepInfo

    times = []
    for i in range(n):
        start = time.perf_counter()
        trainer.step(StepInfo(i, 10**6, 50))
        sync()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch

    from QGSegmentationLib.data.phantom import make_phantom_dataset
    from QGSegmentationLib.errors import DataError

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    variants = [(p, c) for c in ("off", "on") for p in ("fp32", "bf16", "fp16")] if cuda else [("fp32", "off")]
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if cuda else 'cpu'}, "
          f"{args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed) steps per variant")
    with tempfile.TemporaryDirectory() as root:
        for config in args.configs:
            dataset = make_phantom_dataset(f"{root}/{config}", n_labeled=4, n_unlabeled=4, n_validation=1,
                                           shape=CONFIGS[config]["phantom"])
            for method in args.methods:
                trainers = {v: build_trainer(root, config, method, args.device, *v, dataset) for v in variants}
                times = {v: [] for v in variants}
                peaks = {}
                for _ in range(args.rounds):
                    for v, trainer in list(trainers.items()):
                        if cuda:
                            torch.cuda.reset_peak_memory_stats()
                        try:
                            timed_steps(trainer, args.warmup, sync)
                            times[v] += timed_steps(trainer, args.steps, sync)
                        except DataError as exc:  # a NaN loss
                            print(f"{config:7s} {method:4s} {v[0]} channels_last={v[1]}: {exc}")
                            del trainers[v], times[v]
                            continue
                        if cuda:
                            peaks[v] = torch.cuda.max_memory_allocated() / 2**20
                base = statistics.median(times[variants[0]]) if variants[0] in times else None
                for v in times:
                    med = statistics.median(times[v])
                    ratio = f"{med / base:.2f}x fp32 contiguous" if base else "fp32 diverged"
                    peak = f", peak {peaks[v]:.0f} MiB" if cuda else ""
                    print(f"{config:7s} {method:4s} {v[0]:4s} channels_last={v[1]:3s}: median step "
                          f"{med * 1000:8.1f} ms  ({ratio}){peak}")
                del trainers
                if cuda:
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
