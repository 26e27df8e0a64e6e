"""Time the training step of `qgseg train` under its precision / memory-format switches.

    python bench/bench_train_step.py --device cuda                        # LA CPU and GPU configs
    python bench/bench_train_step.py --device cpu --configs la_cv la_cpu --methods sup --rounds 3
    python bench/bench_train_step.py --device cuda --precisions bf16 --channels-last on --reads 1 10

Each configuration builds the real `Trainer` (the same networks, method, sampler, loss and
optimizer as `qgseg train`) on a synthetic phantom dataset large enough for its patch, once per
variant (`amp` on/off x `channels_last` on/off; on a CPU only fp32, with
channels_last off and on). Variants
alternate in `--rounds` blocks of `--warmup` untimed and `--steps` timed steps, so drift of the
machine hits them all; each step ends with a device synchronisation. Prints, per configuration,
the median step time of each variant and its ratio to the first one, and the peak GPU memory.
A variant whose loss turns NaN (`qgseg train` stops such a run) is reported and dropped.
`--reads` also varies how often the losses are read back from the device (`Trainer.read_losses`;
`qgseg train` reads every 10 steps on a GPU, every step on a CPU).
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
    # bench/la_crossval.py's unet5 recipes (BENCHMARKS §12-§16): the default UNet 16-256 on 48³ at 1.25 mm
    "la_cv": dict(network="unet", network_options={}, patch_size=(48, 48, 48), batch_size=2, phantom=(56, 96, 96)),
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


def timed_steps(trainer, n, sync, read_every):
    """Per-step times of n steps (n a multiple of read_every): each window of read_every steps,
    losses read back once at its end, is timed whole and split evenly."""
    from QGSegmentationLib.ssl.base import StepInfo

    times = []
    for first in range(0, n, read_every):
        start = time.perf_counter()
        pending = [trainer.step(StepInfo(i, 10**6, 50)) for i in range(first, first + read_every)]
        trainer.read_losses(pending, first)
        sync()
        times += [(time.perf_counter() - start) / read_every] * read_every
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--reads", nargs="+", type=int, default=[1], metavar="N",
                        help="read the losses back every N steps (--steps and --warmup must be multiples)")
    args = parser.parse_args()

    import torch

    from QGSegmentationLib.data.phantom import make_phantom_dataset
    from QGSegmentationLib.errors import DataError

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    variants = ([(p, c, r) for r in args.reads for c in args.channels_last for p in args.precisions] if cuda
                else [("fp32", c, r) for r in args.reads for c in args.channels_last])
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if cuda else 'cpu'}, "
          f"{args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed) steps per variant")
    with tempfile.TemporaryDirectory() as root:
        for config in args.configs:
            dataset = make_phantom_dataset(f"{root}/{config}", n_labeled=4, n_unlabeled=4, n_validation=1,
                                           shape=CONFIGS[config]["phantom"])
            for method in args.methods:
                trainers = {v: build_trainer(root, config, method, args.device, *v[:2], dataset) for v in variants}
                times = {v: [] for v in variants}
                peaks = {}
                for _ in range(args.rounds):
                    for v, trainer in list(trainers.items()):
                        if cuda:
                            torch.cuda.reset_peak_memory_stats()
                        try:
                            timed_steps(trainer, args.warmup, sync, v[2])
                            times[v] += timed_steps(trainer, args.steps, sync, v[2])
                        except DataError as exc:  # a NaN loss
                            print(f"{config:7s} {method:4s} {v[0]} channels_last={v[1]} reads={v[2]}: {exc}")
                            del trainers[v], times[v]
                            continue
                        if cuda:
                            peaks[v] = torch.cuda.max_memory_allocated() / 2**20
                base = statistics.median(times[variants[0]]) if variants[0] in times else None
                for v in times:
                    med = statistics.median(times[v])
                    ratio = f"{med / base:.2f}x the first variant" if base else "first variant diverged"
                    peak = f", peak {peaks[v]:.0f} MiB" if cuda else ""
                    print(f"{config:7s} {method:4s} {v[0]:4s} channels_last={v[1]:3s} reads={v[2]:<2d}: median step "
                          f"{med * 1000:8.1f} ms  ({ratio}){peak}")
                del trainers
                if cuda:
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
