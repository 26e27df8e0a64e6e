"""A segmenter trained with several seeds, segmenting as one: its members' softmaxes averaged.

On LA, on a CPU, three trainings of 2000 iterations ensembled beat two of 2800 (as long
together), which beat one of 3600 (BENCHMARKS.md §16, §17 b). `qgseg train --seeds N` trains the members one
after the other, each in `seed-<s>/` as a complete run of its own (checkpoints, resume state,
curves, manifest), then writes the ensemble where a single run's checkpoints would be:
`checkpoints/best.pt` (the members' best weights) and `checkpoints/last.pt` (their last). Those
two files hold weights only, so `qgseg predict`, `evaluate` and the Slicer panel take them as they
take any checkpoint; what resuming needs stays in the members. A finished member (its
`member.json` is there) is not trained again, so an interrupted or cancelled run resumes inside
the member it stopped in, and `<run-dir>/CANCEL` stops whichever member is training.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..errors import ConfigError, RunFolderError
from ..fileio import read_json, write_json_atomic
from .cancel import CancelToken
from .checkpoint import checkpoint_dir, load_checkpoint, member_dir, save_checkpoint
from .events import MemberEvents

MEMBER_RESULT_FILE = "member.json"
ENSEMBLE_RESULT_FILE = "ensemble.json"
CURVES_FILE = "training_curves.png"  # every member's curves in one figure, where a single run has its own
#: what must agree between members for their softmaxes to be averaged on one grid
SHARED_FIELDS = ("mode", "n_classes", "labels", "preprocess", "patch_size")


def member_seeds(first_seed: int, n_seeds: int) -> List[int]:
    if n_seeds < 2:
        raise ConfigError(f"--seeds: give 1 (one model, the default) or 2 or more (an ensemble), not {n_seeds}")
    return [first_seed + k for k in range(n_seeds)]


def train_seed_ensemble(config, n_seeds: int, run_dir: str | os.PathLike, events=None, progress_bar: bool = True,
                        resume: bool = True, say: Optional[Callable[[str], None]] = None,
                        command: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train `config` with seeds config.seed, config.seed + 1, ... (n_seeds of them), one after the
    other, and write their ensemble as `run_dir/checkpoints/best.pt` and `last.pt`."""
    from .. import plots

    run_dir = Path(run_dir)
    seeds = member_seeds(config.seed, n_seeds)
    cancel = CancelToken(run_dir)
    members = []
    for k, seed in enumerate(seeds):
        member_config = dataclasses.replace(config, seed=seed)
        requested = member_config.to_dict()  # before the Trainer fills in the planned spacing and patch
        finished = finished_member(member_dir(run_dir, seed), requested) if resume else None
        if finished is None:
            if say:
                say(f"member {k + 1} of {n_seeds}: seed {seed}, in {member_dir(run_dir, seed)}")
            member_events = None if events is None else MemberEvents(
                events, f"seed {seed} ({k + 1} of {n_seeds}): ", share=(k, n_seeds))
            finished = train_member(member_config, member_dir(run_dir, seed), requested, member_events,
                                    progress_bar, resume, say, cancel, command, k + 1)
        members.append(finished)
    checkpoints = {which: combine_checkpoints([checkpoint_dir(member_dir(run_dir, s)) / f"{which}.pt" for s in seeds],
                                              checkpoint_dir(run_dir) / f"{which}.pt", seeds)
                   for which in ("best", "last")}
    share_split(run_dir, seeds)
    curves = plots.member_training_curves(
        {f"seed {s}": read_json(member_dir(run_dir, s) / "history.json", "member history") for s in seeds},
        run_dir / CURVES_FILE, title=f"{config.method} / {config.network}, {n_seeds} seeds")
    summary = {"seeds": seeds, "best_checkpoint": str(checkpoints["best"]),
               "last_checkpoint": str(checkpoints["last"]), "curves": str(curves), "members": members}
    write_json_atomic(run_dir / ENSEMBLE_RESULT_FILE, summary)
    return summary


def train_member(config, folder: Path, requested: Dict[str, Any], events, progress_bar: bool, resume: bool,
                 say, cancel: CancelToken, command: Optional[List[str]], number: int) -> Dict[str, Any]:
    """One member's run, as `qgseg train` writes it (checkpoints, curves, history, manifest), and
    its `member.json`, which marks it finished."""
    from .manifest import recorded_run
    from .trainer import Trainer

    trainer = Trainer(config, folder, events=events, progress_bar=progress_bar, resume=resume, say=say,
                      cancel=cancel)
    with recorded_run(folder, command=command or [], config=config, device=trainer.device,
                      seed=config.seed, started=time.time(), extra={"ensemble_member": number}):
        result = trainer.fit()
    write_json_atomic(folder / "history.json", result.history)
    member = {"seed": config.seed, "run_dir": str(folder), "best_metric": result.best_metric,
              "best_iteration": result.best_iteration, "iterations": result.iterations,
              "wall_time_s": round(result.wall_time_s, 2), "requested_config": requested}
    write_json_atomic(folder / MEMBER_RESULT_FILE, member)
    return member


def finished_member(folder: Path, requested: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The member's result if it finished with the options asked for now; otherwise None, and its
    Trainer resumes it as `qgseg train` resumes any run (e.g. on to more --iterations)."""
    path = folder / MEMBER_RESULT_FILE
    if not path.is_file():
        return None
    member = read_json(path, "finished ensemble member")
    return member if member.get("requested_config") == requested else None


def share_split(run_dir: Path, seeds: List[int]) -> None:
    """The members' split.json as the ensemble's, where they agree (a dataset with a validation
    list); held out by seed (`--n-validation`), each member's validation cases stay in its folder."""
    from ..data.dataset import SPLIT_FILE

    splits = [read_json(member_dir(run_dir, s) / SPLIT_FILE, "member split") for s in seeds]
    if all(split == splits[0] for split in splits):
        write_json_atomic(run_dir / SPLIT_FILE, splits[0])
    elif (run_dir / SPLIT_FILE).exists():
        (run_dir / SPLIT_FILE).unlink()


def combine_checkpoints(paths: List[Path], output: Path, seeds: List[int]) -> Path:
    """One weights-only checkpoint holding every member's inference networks, which
    `load_segmenter` averages like a dual network's two (their softmaxes)."""
    states = [load_checkpoint(p) for p in paths]
    first = states[0]
    for path, state in zip(paths[1:], states[1:]):
        for name in SHARED_FIELDS:
            if state[name] != first[name]:
                raise ConfigError(f"{path}: cannot be ensembled with {paths[0]}: its {name} differs "
                                  f"({state[name]} vs {first[name]})")
    networks = [(s["network_names"][i], s["networks"][i]) for s in states for i in s["inference_networks"]]
    combined = {key: first[key] for key in ("format", "format_version", "config", "versions", *SHARED_FIELDS)}
    combined.update({
        "network_names": [name for name, _ in networks], "networks": [weights for _, weights in networks],
        "inference_networks": list(range(len(networks))),
        "iteration": first["iteration"] if len({s["iteration"] for s in states}) == 1 else None,
        "ensemble_seeds": list(seeds), "ensemble_members": [str(p) for p in paths],
        "best_metric": [float(s["best_metric"]) for s in states],
        "best_iteration": [int(s["best_iteration"]) for s in states],
    })
    return save_checkpoint(output, combined)


def refuse_ensemble_resume(state: Dict[str, Any], path: Path) -> None:
    """An ensemble's last.pt holds weights only: a plain `qgseg train` cannot go on from it."""
    if "ensemble_seeds" in state:
        n = len(state["ensemble_seeds"])
        raise RunFolderError(f"{path}: this run folder holds an ensemble of {n} seeds (`qgseg train --seeds {n}`), "
                             "which a single training cannot resume",
                             hint=f"pass --seeds {n} to resume or extend it, or choose another --run-dir")
