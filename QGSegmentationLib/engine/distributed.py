"""Multi-GPU / multi-node training under `torchrun` with PyTorch DistributedDataParallel.

`torchrun` starts one process per device and tells each its place through the environment
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). `DistributedContext.setup()`
reads it, picks the device (`cuda:LOCAL_RANK` on GPUs) and joins the process group with the
backend that fits the device: NCCL for CUDA, gloo for CPU. Without torchrun (or with
`WORLD_SIZE=1`) it starts nothing, and every collective below is a no-op that returns its input,
so single-process training is unchanged.

Policies the trainers follow (documented for users in docs/distributed.md):
- data: every rank samples from all cases with its own random streams, seeded
  `rank_seed(seed, rank) = seed + rank * RANK_SEED_STRIDE` (rank 0 uses `seed` itself, so rank 0
  of a distributed run draws what a single-process run draws); the global batch is
  `batch_size * world_size`. The quality predictor's map-style samples are instead partitioned:
  each global batch of the single-process order is split into disjoint per-rank slices.
- networks: wrapped in DDP (gradients averaged across ranks); `find_unused_parameters=True`
  unless `QGSEG_DDP_FIND_UNUSED=0`, so methods whose loss skips some parameters do not hang.
- files: only rank 0 writes (checkpoints, events, history, plots); other ranks wait at a barrier.
- decisions (cancel, divergence, best checkpoint, early stopping) are taken once and shared, so
  all ranks leave the loop at the same iteration.

Importing this module does not import torch.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

from ..errors import ConfigError

#: Offset between the seeds of consecutive ranks (sampler, torch, numpy and Python RNGs).
RANK_SEED_STRIDE = 1000
#: Collective timeout in minutes (ranks wait for rank 0 while it validates or writes).
TIMEOUT_ENV = "QGSEG_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 60
#: Set to 0 to run DDP with find_unused_parameters=False (a little faster; only for methods
#: whose loss uses every parameter of every network in every step).
FIND_UNUSED_ENV = "QGSEG_DDP_FIND_UNUSED"


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process stands in a torchrun launch (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str, default: int, environ) -> int:
    text = environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer "
                          "(it is set by torchrun; do not set it by hand)") from None


def launch_env(environ=None) -> LaunchEnv:
    """Read RANK / LOCAL_RANK / WORLD_SIZE as torchrun sets them; checks they are consistent."""
    environ = os.environ if environ is None else environ
    world = _int_env("WORLD_SIZE", 1, environ)
    rank = _int_env("RANK", 0, environ)
    local = _int_env("LOCAL_RANK", rank if world > 1 else 0, environ)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank}, LOCAL_RANK={local}, "
                          f"WORLD_SIZE={world} (need 0 <= RANK < WORLD_SIZE)")
    return LaunchEnv(rank=rank, local_rank=local, world_size=world)


def is_main_process(environ=None) -> bool:
    """True on rank 0 and in an ordinary single process (no process group needed)."""
    return launch_env(environ).is_main


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random streams; rank 0 keeps `seed`."""
    return int(seed) + int(rank) * RANK_SEED_STRIDE


def unwrap(module):
    """The module inside a DistributedDataParallel wrapper (or `module` itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


class DistributedContext:
    """Rank, device and the few collectives the trainers need. With one process every method
    is a no-op that returns its input, so callers need no `if distributed` branches."""

    def __init__(self, env: LaunchEnv, device):
        self.env = env
        self.device = device

    # ------------------------------------------------------------------ set-up
    @classmethod
    def setup(cls, requested_device: Any = "auto", environ=None) -> "DistributedContext":
        """Resolve the device and, under torchrun with WORLD_SIZE > 1, join the process group
        (idempotent: a second trainer in the same process reuses the group)."""
        import torch

        from .device import resolve_device

        env = launch_env(environ)
        device = resolve_device(requested_device) if isinstance(requested_device, str) \
            else torch.device(requested_device)
        if not env.distributed:
            return cls(env, device)
        import torch.distributed as dist

        if device.type == "cuda":
            count = torch.cuda.device_count()
            if env.local_rank >= count:
                raise ConfigError(f"LOCAL_RANK {env.local_rank} has no GPU: this machine shows {count} "
                                  "CUDA device(s); start at most that many processes per node "
                                  "(torchrun --nproc_per_node)")
            device = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_available():
            raise ConfigError("this torch build has no torch.distributed; cannot train under torchrun")
        if not dist.is_initialized():
            minutes = _int_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN, os.environ if environ is None else environ)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=minutes))
            global _JOINED
            _JOINED = True
        elif dist.get_world_size() != env.world_size:
            raise ConfigError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE is "
                              f"{env.world_size}")
        return cls(env, device)

    @property
    def enabled(self) -> bool:
        return self.env.distributed

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def backend(self) -> Optional[str]:
        if not self.enabled:
            return None
        import torch.distributed as dist

        return dist.get_backend()

    # ------------------------------------------------------------------ models
    def convert_sync_batchnorm(self, networks: Sequence, enabled: bool, option: str = "sync_batchnorm") -> List:
        """BatchNorm -> SyncBatchNorm (statistics over the global batch) when asked and useful.

        In place for networks whose top module is not a norm layer, so references held elsewhere
        stay valid. torch implements SyncBatchNorm for GPUs only, hence the error on CPU."""
        networks = list(networks)
        if not enabled or not self.enabled:
            return networks
        if self.device.type != "cuda":
            raise ConfigError(f"{option}=true needs CUDA devices (torch's SyncBatchNorm does not run on "
                              f"CPU/gloo); drop --set {option}=true or train on GPUs")
        import torch

        return [torch.nn.SyncBatchNorm.convert_sync_batchnorm(n) for n in networks]

    def wrap(self, module):
        """DistributedDataParallel(module) under torchrun; `module` itself otherwise. Parameters
        and buffers are broadcast from rank 0 when wrapping, so all ranks start identical."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        if not any(p.requires_grad for p in module.parameters()):
            return module  # nothing to synchronise (frozen networks)
        find_unused = os.environ.get(FIND_UNUSED_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        if self.device.type == "cuda":
            return DistributedDataParallel(module, device_ids=[self.device.index],
                                           output_device=self.device.index,
                                           find_unused_parameters=find_unused)
        return DistributedDataParallel(module, find_unused_parameters=find_unused)

    def sync_buffers(self, modules: Sequence) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank, so EMA teachers
        that copy them stay identical across ranks."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for module in modules:
            for buffer in unwrap(module).buffers():
                dist.broadcast(buffer.data, src=0)

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist

        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (pickled)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def call_on_main(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 only and hand its result to every rank (e.g. reading last.pt)."""
        return self.broadcast_object(fn() if self.is_main else None)

    def all_gather_objects(self, obj: Any) -> List[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def main_flag(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (decisions rank 0 takes, e.g. 'the cancel file exists')."""
        if not self.enabled:
            return bool(flag)
        return bool(self._reduce([1.0 if flag else 0.0], op="broadcast")[0])

    def any_true(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if not self.enabled:
            return bool(flag)
        return bool(self._reduce([1.0 if flag else 0.0], op="max")[0])

    def sum_values(self, values: Sequence[float]) -> List[float]:
        """Element-wise sums over ranks (float64), identical on every rank."""
        if not self.enabled:
            return [float(v) for v in values]
        return self._reduce(values, op="sum")

    def mean_dict(self, values: Dict[str, float]) -> Dict[str, float]:
        """Per key, the mean over the ranks that report it (keys in rank 0's order first)."""
        if not self.enabled:
            return dict(values)
        gathered = self.all_gather_objects({k: float(v) for k, v in values.items()})
        keys = list(gathered[0]) + [k for g in gathered[1:] for k in g if k not in gathered[0]]
        out = {}
        for key in keys:
            found = [g[key] for g in gathered if key in g]
            out[key] = sum(found) / len(found)
        return out

    def _reduce(self, values: Sequence[float], op: str) -> List[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._tensor_device())
        if op == "broadcast":
            dist.broadcast(tensor, src=0)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            if op == "sum":  # floating-point sums: make them bit-identical on every rank
                dist.broadcast(tensor, src=0)
        return [float(v) for v in tensor.cpu().tolist()]

    def _tensor_device(self):
        return self.device if self.device.type == "cuda" else "cpu"

    def _object_device(self):
        return self.device if self.device.type == "cuda" else None


def shutdown() -> None:
    """Leave the process group if this process joined one (end of a `qgseg` command)."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


#: Whether this process joined a process group (a torchrun worker); see `exit_worker`.
_JOINED = False


def joined_process_group() -> bool:
    return _JOINED


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker process without Python's interpreter finalization.

    A gloo worker thread can hold the last reference to a finished collective (a barrier and the
    all-gather before it), and with it tensors made in Python. If it lets go while the main thread
    finalizes the interpreter, taking the GIL ends that thread by a forced unwind through a
    destructor, and the whole process aborts (SIGABRT, "terminate called without an active
    exception"; torch 2.13: 2 of about 30 runs of the two-process quality test). Everything a
    command writes is written atomically and closed before it returns, so only the streams are
    left to flush."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to lose
            pass
    os._exit(code)
