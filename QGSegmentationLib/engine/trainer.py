"""The training loop shared by every method: supervised training is simply the `sup` method.

One `Trainer.fit()` call: prepare data (decoded once, cached), build the method's networks and one
optimizer per network, then iterate: sample labeled (+ unlabeled) batches, `method.training_step`,
one backward, clip, step, `method.after_optimizer_step`. Validation Dice on the validation split
every `val_every` iterations selects `best.pt`; `last.pt` is written every `checkpoint_every`
iterations and on cancel, so a crashed or cancelled run resumes exactly where it stopped
(network, optimizer, scheduler, method state such as EMA teachers, sampler and torch RNG states).

Under `torchrun` (see `engine.distributed`) the same loop runs on every rank: networks are
wrapped in DistributedDataParallel and handed to the method, each rank samples its own batches
(seeds `rank_seed(seed, rank)`), validation cases are split over the ranks and the Dice reduced,
and only rank 0 writes checkpoints and events. Checkpoints keep every rank's sampler and RNG
states, so a resumed run with the same number of processes continues exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from ..errors import ConfigError, DataError, RunFolderError
from .cancel import CancelToken
from .checkpoint import FORMAT, FORMAT_VERSION, checkpoint_dir, load_checkpoint, plain, save_checkpoint
from .config import GUIDANCE_NEEDS_PREDICTOR, TrainConfig
from .device import autocast, autocast_dtype, maybe_inject_fault, translate_oom
from .distributed import DistributedContext, rank_seed, unwrap
from .events import EventWriter
from .manifest import package_versions
from .seed_ensemble import refuse_ensemble_resume


#: Fewest voxels along an axis a resampled labeled volume may keep (see check_patch_fits_the_volumes).
MIN_VOLUME_VOXELS = 4


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_metric: float
    best_iteration: int
    iterations: int
    wall_time_s: float
    history: List[Dict[str, Any]] = field(default_factory=list)


def with_validation(spec, cfg: TrainConfig):
    """The dataset with validation cases: its own list, or labeled cases held out by a seeded
    shuffle; refused, naming the dataset, when none would validate or none would train."""
    from ..data.dataset import held_out_count, split_validation

    if not spec.validation:
        try:
            spec = split_validation(spec, held_out_count(cfg.n_validation, len(spec.training)), seed=cfg.seed)
        except DataError as exc:
            raise DataError(f"{cfg.dataset}: {exc}", hint="checkpoints are chosen on validation cases: label "
                            "one more case, or add a \"validation\" list to the dataset") from None
    if not spec.validation:
        raise ConfigError(f"{cfg.dataset}: no validation cases: the dataset lists none and n_validation is "
                          f"{cfg.n_validation}", hint="checkpoints are chosen on validation cases: add a "
                          "\"validation\" list to the dataset or hold some out with --n-validation 1 (or more)")
    return spec


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_scheduler(optimizer, cfg: TrainConfig):
    total, warm = cfg.iterations, cfg.warmup_iterations

    def factor(it: int) -> float:
        if warm and it < warm:
            return (it + 1) / warm
        progress = min(1.0, (it - warm) / max(1, total - warm))
        if cfg.schedule == "poly":
            return (1 - progress) ** 0.9
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def backward_and_step(loss, scaler, optimizers, networks, grad_clip: float) -> None:
    """One backward through the (AMP-scaled) loss, per-network gradient clipping, one step each."""
    scaler.scale(loss).backward()
    for opt, net in zip(optimizers, networks):
        if grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        scaler.step(opt)
    scaler.update()


def make_optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


READ_LOSSES_EVERY = 10  # steps between reads of the losses from the device (each read waits for it)
# What a resumed run must share with the run that wrote its last.pt: what the networks are.
RESUME_MUST_MATCH = ("mode", "network", "network_options", "other_network_options", "method")


class Trainer:
    """Trains one method on one dataset into `run_dir`. See module docstring."""

    def __init__(self, config: TrainConfig, run_dir: str | Path, events: Optional[EventWriter] = None,
                 progress_bar: bool = True, resume: bool = True, say: Optional[Callable[[str], None]] = None,
                 cancel: Optional[CancelToken] = None):
        config.validate()
        self.cfg = config
        self.run_dir = Path(run_dir)
        self.dist = DistributedContext.setup(config.device)
        self.device = self.dist.device
        # only rank 0 reports and shows progress; other ranks stay silent
        self.events = (events or EventWriter()) if self.dist.is_main else EventWriter()
        self.progress_bar = progress_bar and self.dist.is_main
        self.resume = resume
        self.say = say if self.dist.is_main else None
        self.cancel = cancel or CancelToken(self.run_dir)  # a --seeds member: its ensemble's CANCEL
        self.history: List[Dict[str, Any]] = []
        self.best_metric = -1.0
        self.best_iteration = -1

    # ------------------------------------------------------------------ data
    def prepare_data(self):
        from ..data.cache import CaseStore
        from ..data.dataset import SPLIT_FILE, checked_dataset, load_dataset, write_split_file
        from ..data.preprocess import PreprocessConfig, Preprocessor

        cfg = self.cfg
        if not cfg.dataset:
            raise ConfigError("no dataset given: pass --dataset path/to/dataset.json")
        # rank 0 opens every file first: all problems at once, and warnings (empty labels, unused classes)
        spec = checked_dataset(cfg.dataset, self.events.warning) if self.dist.is_main else load_dataset(cfg.dataset)
        self.spec = spec = with_validation(spec, cfg)
        if self.dist.is_main:
            write_split_file(spec, self.run_dir / SPLIT_FILE, written_by="qgseg train")
        if cfg.needs_plan:
            self.apply_plan()
        self.preprocessor = Preprocessor(PreprocessConfig(
            target_spacing=cfg.target_spacing, normalization=cfg.normalization,
            clip_percentiles=tuple(cfg.clip_percentiles), crop_foreground=cfg.crop_foreground,
            label_resampling=cfg.label_resampling))
        store = CaseStore(self.preprocessor, cache_dir=cfg.cache_dir, allowed_labels=sorted(spec.labels))
        self.store = store
        self.labeled = store.load_many(spec.training, progress=self.progress_bar, desc="loading labeled cases")
        self.validation = store.load_many(spec.validation, progress=self.progress_bar,
                                          desc="loading validation cases")
        self.n_classes = spec.n_classes
        self.check_patch_fits_the_volumes()

    def check_patch_fits_the_volumes(self) -> None:
        """Volumes resampled to a few voxels (a spacing in the wrong unit, say 1000) are refused:
        nothing can be learnt from them. A patch much larger than the volumes is warned about:
        each patch would be mostly padding, and every step slow."""
        from ..data.planning import patch_text, spacing_text

        cfg = self.cfg
        in_plane = 2 if cfg.mode == "2d" else 3  # 2D patches are y x: a volume may have few slices
        shapes = np.array([case.image.shape[-in_plane:] for case in self.labeled])
        smallest = shapes.min(axis=0)
        if smallest.min() < MIN_VOLUME_VOXELS:
            spacing = "their own spacing" if cfg.target_spacing is None else f"{spacing_text(cfg.target_spacing)} mm"
            raise ConfigError(f"at {spacing} the smallest labeled volume is only {patch_text(smallest)} voxels "
                              f"({'y x' if in_plane == 2 else 'z y x'}): too few to learn from",
                              hint="choose a finer --spacing (in mm, x y z), or --spacing auto")
        median = np.median(shapes, axis=0)
        if any(p > 2 * m for p, m in zip(cfg.patch_size, median)):
            self.events.warning(f"patch {patch_text(cfg.patch_size)} is more than twice the median labeled volume "
                                f"({patch_text(np.round(median))} voxels): each patch is mostly padding and "
                                "every step slower than it need be; --patch auto plans one that fits")

    def apply_plan(self) -> None:
        """Replace "auto" spacing / patch size by the plan for these labeled cases on this device
        (data/planning.py). The plan is kept in <run-dir>/plan.json, so a resumed run, even on
        another device, keeps it; checkpoints and manifest record the planned values."""
        from ..data.planning import PLAN_FILE, patch_text, plan_for_spec, read_plan, spacing_text
        from ..fileio import write_json_atomic

        cfg = self.cfg
        plan = read_plan(self.run_dir) if self.resume else None
        if plan is None or plan.mode != cfg.mode:
            plan = plan_for_spec(self.spec, cfg.mode, self.device.type, spacing=cfg.target_spacing)
            if self.dist.is_main:
                write_json_atomic(self.run_dir / PLAN_FILE, plan.to_dict())
        given = [name for name, value in (("spacing", cfg.target_spacing), ("patch", cfg.patch_size)) if value != "auto"]
        cfg.apply_plan(plan)
        spacing = "each volume's own" if cfg.target_spacing is None else spacing_text(cfg.target_spacing)
        origin = f"planned for {plan.device} from {plan.fingerprint['cases']} labeled cases"
        origin = f"{' and '.join(given)} as given, the rest {origin}" if given else origin
        self.note(f"spacing {spacing} mm, patch {patch_text(cfg.patch_size)} "
                  f"({'z y x' if cfg.mode == '3d' else 'y x'}): {origin} (the plan is in {PLAN_FILE}; "
                  "--spacing and --patch override it)")

    def note(self, message: str) -> None:
        """Tell the user something that is not a problem: a `note` event, and the terminal."""
        self.events.note(message)
        if self.say is not None:
            self.say(message)

    def load_unlabeled(self) -> None:
        """Decode the unlabeled images, only when the method (as configured) uses them."""
        cfg = self.cfg
        self.unlabeled = []
        if not getattr(self.method, "uses_unlabeled", False):
            return
        refs = list(self.spec.unlabeled)[: cfg.max_unlabeled] if cfg.max_unlabeled else list(self.spec.unlabeled)
        if not refs:
            raise DataError(f"{cfg.dataset}: method '{cfg.method}' needs unlabeled images, but the dataset "
                            "lists none under \"unlabeled\"")
        self.unlabeled = self.store.load_many(refs, progress=self.progress_bar, desc="loading unlabeled cases")

    def make_samplers(self):
        from ..data.augment import AugmentConfig, Augmenter
        from ..data.samplers import PatchSampler

        cfg = self.cfg
        seed = rank_seed(cfg.seed, self.dist.rank)  # every rank its own stream; rank 0 keeps cfg.seed
        augmenter = Augmenter(AugmentConfig.from_dict(cfg.augmentation, source="augmentation"))
        self.labeled_sampler = PatchSampler(self.labeled, cfg.patch_size, cfg.batch_size, mode=cfg.mode,
                                            fg_ratio=cfg.fg_ratio, augment=cfg.augment, seed=seed,
                                            augmenter=augmenter, center_jitter=cfg.center_jitter)
        self.unlabeled_sampler = None
        if self.unlabeled:
            self.unlabeled_sampler = PatchSampler(self.unlabeled, cfg.patch_size, cfg.unlabeled_batch_size,
                                                  mode=cfg.mode, fg_ratio=0.0, augment=cfg.augment,
                                                  seed=seed + 1, with_labels=False, augmenter=augmenter)

    # ------------------------------------------------------------------ model
    def _method_cls(self):
        from ..ssl.methods import METHODS

        return METHODS.get(self.cfg.method)

    def network_names(self) -> List[str]:
        method_cls = self._method_cls()
        names_fn = getattr(method_cls, "network_names", None)
        if names_fn is not None:
            names = names_fn(_MethodConfig(self.cfg, self.ssl_config))
            if names:
                return [self.cfg.network if n is None else n for n in names]
        return [self.cfg.network] * int(getattr(method_cls, "num_networks", 1))

    def build(self):
        from ..networks import build_network, member_options
        from ..ssl.base import SSLConfig

        cfg = self.cfg
        self.ssl_config = SSLConfig.from_dict(cfg.ssl, source="ssl options")
        dims = 2 if cfg.mode == "2d" else 3
        self.networks = []
        for index, name in enumerate(self.network_names()):
            torch.manual_seed(cfg.seed * 1009 + index)  # differently initialised networks (CPS)
            options = member_options(name, cfg.network, cfg.network_options, cfg.patch_size,
                                     cfg.other_network_options)
            net = build_network(name, dims, 1, self.n_classes, **options)
            self.networks.append(net.to(self.device))
        if self.use_channels_last:
            fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
            self.networks = [n.to(memory_format=fmt) for n in self.networks]
        self.networks = self.dist.convert_sync_batchnorm(self.networks, cfg.sync_batchnorm)
        guidance = self.build_guidance()
        method_config = _MethodConfig(cfg, self.ssl_config)
        self.method = self._method_cls()(self.networks, method_config, guidance)
        if self.dist.enabled:
            # The method was built on the plain networks (EMA teachers and evaluation ensembles
            # copy/hold those); its training forwards go through the DDP wrappers, which share
            # the plain networks' parameters, so the optimizers below see averaged gradients.
            self.method.networks = [self.dist.wrap(n) for n in self.networks]
        self.optimizers = [make_optimizer(n.parameters(), cfg) for n in self.networks]
        self.schedulers = [make_scheduler(o, cfg) for o in self.optimizers]
        # loss scaling only for float16: bfloat16 has float32's range
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def build_guidance(self):
        wants = bool(self.ssl_config_flag("guidance_qar") or self.ssl_config_flag("guidance_qw"))
        if not wants:
            return None
        if not self.cfg.quality_checkpoint:
            raise ConfigError(GUIDANCE_NEEDS_PREDICTOR)
        from ..quality.predictor import check_scores_labels, load_predictor
        from ..ssl.guidance import QualityGuidance

        predictor = load_predictor(self.cfg.quality_checkpoint, device=self.device)
        if predictor.spatial_dims != (2 if self.cfg.mode == "2d" else 3):
            raise ConfigError(f"{self.cfg.quality_checkpoint}: a {predictor.spatial_dims}D quality predictor cannot "
                              f"guide {self.cfg.mode} training", hint=f"train g with --mode {self.cfg.mode}")
        mismatch = check_scores_labels(predictor, self.spec.labels, self.cfg.quality_checkpoint, "the dataset")
        if mismatch:
            self.events.warning(mismatch)
        self.warn_of_unfinished_guidance()
        return QualityGuidance(predictor, self.ssl_config)

    def warn_of_unfinished_guidance(self) -> None:
        """A QAR / QW ramp that does not finish inside the run gives the term a fraction of its
        weight (or none): say so, with a schedule of the same shape that fits."""
        from ..ssl.config import guidance_schedule_for

        cfg = self.cfg
        run_epochs = cfg.iterations / cfg.iterations_per_epoch
        short = self.ssl_config.guidance_shortfall(run_epochs)
        if not short:
            return
        reached = ", ".join(f"{name.upper()} {fraction:.0%} of its weight" for name, fraction in short.items())
        fitted = " ".join(f"--set ssl.{k}={v:g}" for k, v in guidance_schedule_for(run_epochs).items())
        self.events.warning(f"this run is {run_epochs:g} epochs of {cfg.iterations_per_epoch} iterations, shorter "
                            f"than the quality guidance schedule: by its end {reached}. The QG-SSL paper's schedule "
                            f"scaled to this run: {fitted}")

    def ssl_config_flag(self, name: str) -> bool:
        return bool(getattr(self.ssl_config, name, False))

    @property
    def use_amp(self) -> bool:
        return self.device.type == "cuda" and self.cfg.amp != "off"

    @property
    def amp_dtype(self):
        """Autocast dtype of training steps, None for the fp32 path (CPU, or amp off)."""
        return autocast_dtype(self.device, self.cfg.amp_dtype) if self.use_amp else None

    @property
    def use_channels_last(self) -> bool:
        """Channels-last memory by default on CUDA, and for 3D networks on a CPU, where oneDNN's 3D
        convolutions run faster in it (BENCHMARKS.md §17); 2D on a CPU gains nothing."""
        if self.cfg.channels_last != "auto":
            return self.cfg.channels_last == "on"
        return self.device.type == "cuda" or self.cfg.mode != "2d"

    # ------------------------------------------------------------------ state
    def rank_state(self) -> Dict[str, Any]:
        """What differs between ranks: sampler positions and RNG states."""
        return {"samplers": plain({"labeled": self.labeled_sampler.state_dict(),
                                   "unlabeled": self.unlabeled_sampler.state_dict() if self.unlabeled_sampler else None}),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []}

    def state(self, iteration: int) -> Dict[str, Any]:
        """The checkpoint dict. Under torchrun every rank must call it (it gathers rank states)."""
        rank_states = self.dist.all_gather_objects(self.rank_state()) if self.dist.enabled else None
        state = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "config": self.cfg.to_dict(),
            "network_names": self.network_names(),
            "networks": [n.state_dict() for n in self.networks],
            "inference_networks": list(getattr(self.method, "inference_network_indices", range(len(self.networks)))),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "method_state": self.method.extra_state(),
            "samplers": plain({"labeled": self.labeled_sampler.state_dict(),
                               "unlabeled": self.unlabeled_sampler.state_dict() if self.unlabeled_sampler else None}),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "best_metric": self.best_metric, "best_iteration": self.best_iteration,
            "history": self.history,
            "n_classes": self.n_classes,
            "labels": {str(k): v for k, v in self.spec.labels.items()},
            "preprocess": plain(dict(vars(self.preprocessor.config))),
            "mode": self.cfg.mode, "patch_size": list(self.cfg.patch_size),
            "versions": package_versions(),
        }
        if rank_states is not None:
            state["world_size"] = self.dist.world_size
            state["rank_states"] = rank_states
        return state

    def load_state(self, state: Dict[str, Any]) -> int:
        for net, sd in zip(self.networks, state["networks"]):
            net.load_state_dict(sd)
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        for sch, sd in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(sd)
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_extra_state(state["method_state"])
        own = self._own_rank_state(state)
        if own is not None:
            self.labeled_sampler.load_state_dict(own["samplers"]["labeled"])
            if self.unlabeled_sampler and own["samplers"]["unlabeled"] is not None:
                self.unlabeled_sampler.load_state_dict(own["samplers"]["unlabeled"])
            torch.set_rng_state(own["torch_rng"])
            if self.device.type == "cuda" and own["cuda_rng"]:
                torch.cuda.set_rng_state_all(own["cuda_rng"])
        else:  # a rank the checkpoint did not have: fresh streams, distinct from the first run's
            seed_everything(rank_seed(self.cfg.seed, self.dist.rank) + int(state["iteration"]))
        self.best_metric = float(state["best_metric"])
        self.best_iteration = int(state["best_iteration"])
        self.history = list(state["history"])
        return int(state["iteration"])

    def refuse_another_model(self, state: Dict[str, Any], path: Path) -> None:
        """ConfigError when last.pt was written by a run of other networks or labels: its weights
        would not load (or, for a method's extra network, would silently start afresh)."""
        from ..data.dataset import load_dataset

        saved, asked = state.get("config", {}), self.cfg.to_dict()
        differ = [f"{key} {saved[key]!r} there, {asked[key]!r} now" for key in RESUME_MUST_MATCH
                  if key in saved and saved[key] != asked[key]]
        labels = {str(k): v for k, v in load_dataset(self.cfg.dataset).labels.items()} if self.cfg.dataset else None
        if labels is not None and state.get("labels", labels) != labels:
            differ.append(f"labels {state['labels']} there, {labels} now")
        if differ:
            raise RunFolderError(f"{path}: the run folder holds a training of another model ({'; '.join(differ)}), "
                                 "which this one cannot resume",
                                 hint=f"choose another --run-dir, or delete {path.parent} to start over there")

    def keep_recorded_label_resampling(self, recorded: Dict[str, Any]) -> None:
        """A resumed run goes on with the labels it started with: the checkpoint's setting, or
        nearest neighbour where the checkpoint predates the option (and linear as the default)."""
        from ..data.preprocess import UNRECORDED_LABEL_RESAMPLING

        method = recorded.get("label_resampling", UNRECORDED_LABEL_RESAMPLING)
        if method != self.cfg.label_resampling:
            self.events.warning(f"label_resampling={method}, as this run started (its last.pt), not "
                                f"{self.cfg.label_resampling}; start over with --no-resume to change it")
            self.cfg.label_resampling = method

    def _own_rank_state(self, state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """This rank's sampler/RNG states: from `rank_states` (distributed checkpoints), else the
        top-level ones for rank 0; None for a rank beyond those the checkpoint holds."""
        saved = state.get("rank_states")
        if saved and self.dist.rank < len(saved):
            return saved[self.dist.rank]
        if self.dist.rank == 0:
            return state
        return None

    def save(self, name: str, iteration: int) -> Path:
        path = checkpoint_dir(self.run_dir) / name
        state = self.state(iteration)
        if self.dist.is_main:
            save_checkpoint(path, state)
        self.dist.barrier()
        return path

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        started = time.time()
        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        seed_everything(cfg.seed)
        self.events.emit("stage", name="prepare data", index=1, total=2)
        last_path = checkpoint_dir(self.run_dir) / "last.pt"
        state = None
        if self.resume:  # rank 0 decides and reads; every rank gets the same state
            state = self.dist.call_on_main(lambda: load_checkpoint(last_path) if last_path.exists() else None)
            if state is not None:
                refuse_ensemble_resume(state, last_path)
                self.refuse_another_model(state, last_path)
                self.keep_recorded_label_resampling(state["config"])
        self.prepare_data()
        self.build()
        if self.dist.rank > 0:  # after the (identical) network init: per-rank noise/augmentation
            seed_everything(rank_seed(cfg.seed, self.dist.rank))
        self.load_unlabeled()
        self.make_samplers()
        start = 0
        if state is not None:
            start = self.load_state(state)
            if start >= cfg.iterations:  # a rerun of a finished run: nothing to train
                self.note(f"{last_path} has finished all {cfg.iterations} iterations: nothing to train "
                          "(--iterations N for more, --no-resume to start over)")
            else:
                self.events.warning(f"resuming from {last_path} at iteration {start} of {cfg.iterations}")
        self.events.emit("stage", name=f"train ({cfg.method})", index=2, total=2)
        with self.cancel.catching_interrupts():  # Ctrl-C: save last.pt at the next step, then stop
            self.train_loop(start)
        last = self.save("last.pt", cfg.iterations)
        best = checkpoint_dir(self.run_dir) / "best.pt"
        if not best.exists():
            best = last
        self.write_curves()
        return TrainResult(self.run_dir, best, last, self.best_metric, self.best_iteration,
                           cfg.iterations, time.time() - started, self.history)

    def train_loop(self, start: int) -> None:
        from ..ssl.base import StepInfo

        cfg = self.cfg
        bar = _progress_bar(cfg.iterations, start, self.progress_bar)
        t0, step_times = time.time(), []
        running: Dict[str, float] = {}
        pending: List[Dict[str, Any]] = []
        window_start = time.perf_counter()
        read_every = READ_LOSSES_EVERY if self.device.type == "cuda" else 1  # a CPU step has finished
        for it in range(start, cfg.iterations):
            if self.dist.main_flag(self.cancel.requested):  # rank 0 looks, every rank stops
                self.read_losses(pending, first_iteration=it - len(pending))  # no NaN weights saved
                self.save("last.pt", it)
                bar.close()
                raise self.cancel.error()
            with translate_oom(f"training iteration {it}"):
                maybe_inject_fault(it)
                pending.append(self.step(StepInfo(it, cfg.iterations, cfg.iterations_per_epoch)))
            done = it + 1
            validate = done % cfg.val_every == 0 or done == cfg.iterations
            checkpoint = done % cfg.checkpoint_every == 0 and done < cfg.iterations
            if not (done % read_every == 0 or validate or checkpoint):
                continue
            for losses in self.read_losses(pending, first_iteration=done - len(pending)):
                for k, v in losses.items():
                    running[k] = 0.9 * running.get(k, v) + 0.1 * v
            now = time.perf_counter()
            step_times += [(now - window_start) / len(pending)] * len(pending)
            bar.update(len(pending))
            bar.set_postfix({k: f"{v:.3f}" for k, v in list(running.items())[:3]})
            pending, window_start = [], now
            if done % 10 == 0 or done == cfg.iterations:
                rate = (time.time() - t0) / max(1, done - start)
                self.events.progress(done, cfg.iterations, epoch=done // cfg.iterations_per_epoch,
                                     eta_s=rate * (cfg.iterations - done), stage="train")
            if validate:
                self.validate_and_select(done, running, float(np.median(step_times[-50:])))
            if checkpoint:
                self.save("last.pt", done)
        bar.close()

    def step(self, info) -> Dict[str, Any]:
        """One optimizer step; returns the step's losses still on the device (`read_losses` brings
        them back), so that a GPU step does not wait for the previous one to finish."""
        batch_l = _to_device(next(self.labeled_sampler), self.device)
        batch_u = _to_device(next(self.unlabeled_sampler), self.device) if self.unlabeled_sampler else None
        for net in self.method.networks:
            net.train()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            out = self.method.training_step(batch_l, batch_u, info)
        backward_and_step(out["loss"], self.scaler, self.optimizers, self.networks, self.cfg.grad_clip)
        for sch in self.schedulers:
            sch.step()
        self.dist.sync_buffers(self.networks)  # BatchNorm statistics: rank 0's everywhere (EMA teachers)
        self.method.after_optimizer_step(info)
        out = {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}
        return {k: v if torch.is_tensor(v) and v.device.type != "cpu" else float(v) for k, v in out.items()}

    def read_losses(self, pending: List[Dict[str, Any]], first_iteration: int) -> List[Dict[str, float]]:
        """The losses of consecutive steps as floats, read from the device in one transfer; stops
        the run when a loss is not finite (on any rank). A NaN step leaves NaN weights, which the
        next read finds too: reads come before every validation and checkpoint, so no checkpoint
        holds them."""
        device_values = [v.float().reshape(1) for losses in pending for v in losses.values() if torch.is_tensor(v)]
        flat = iter(torch.cat(device_values).tolist() if device_values else [])
        values = [{k: next(flat) if torch.is_tensor(v) else v for k, v in losses.items()} for losses in pending]
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v["loss"])), None)
        if self.dist.any_true(bad is not None):
            where = (f"iteration {first_iteration + bad}: loss is {values[bad]['loss']}" if bad is not None
                     else f"iterations {first_iteration}-{first_iteration + len(pending) - 1} on another rank")
            raise DataError(f"training diverged at {where}",
                            hint="lower the learning rate (--lr) or check the intensity normalisation")
        return values

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> float:
        from ..inference import sliding_window_probs
        from ..metrics import dice

        net = unwrap(self.method.eval_network())
        net.eval()
        scores = []
        cases = self.validation[self.dist.rank::self.dist.world_size]  # each rank its share
        for case in cases:
            image = torch.from_numpy(case.image[None]).float()
            probs = sliding_window_probs(net, image, self.cfg.patch_size, mode=self.cfg.mode,
                                         overlap=self.cfg.sw_overlap, device=self.device, amp=self.use_amp)
            pred = probs.argmax(0).cpu().numpy()
            per_class = [dice(pred, case.label, c) for c in range(1, self.n_classes)]
            scores.append(float(np.mean(per_class)))
        if self.dist.enabled:
            total, count = self.dist.sum_values([float(np.sum(scores)), len(scores)])
            return total / count if count else float("nan")
        return float(np.mean(scores)) if scores else float("nan")

    def validate_and_select(self, done: int, running: Dict[str, float], step_time: float) -> None:
        with translate_oom("validation"):
            val_dice = self.validate()
        running = self.dist.mean_dict(running)  # training losses averaged over ranks
        record = {"iteration": done, "val_dice": val_dice, "step_time_s": step_time,
                  **{f"train_{k}": v for k, v in running.items()}}
        self.history.append(record)
        self.events.metric("val_dice", val_dice, step=done, split="validation")
        if val_dice > self.best_metric:
            self.best_metric, self.best_iteration = val_dice, done
            self.save("best.pt", done)

    def write_curves(self) -> Optional[Path]:
        if not self.history or not self.dist.is_main:
            return None
        from ..plots import training_curves

        return training_curves(self.history, self.run_dir / "training_curves.png",
                               title=f"{self.cfg.method} / {self.cfg.network}")


class _MethodConfig:
    """What a method sees as `config`: the training config's attributes plus `.ssl` (SSLConfig)."""

    def __init__(self, train_config: TrainConfig, ssl_config):
        self._train = train_config
        self.ssl = ssl_config

    def __getattr__(self, name):
        return getattr(self._train, name)


def _to_device(batch: Dict[str, Any], device) -> Dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _progress_bar(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="it",
                dynamic_ncols=True, leave=True)
