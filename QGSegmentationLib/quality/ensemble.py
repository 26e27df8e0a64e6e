"""g trained with several seeds, answering as one: the mean of the members' predictions.

Seeds of g differ much more on real segmentations than on their synthetic validation masks (LA,
48^3 grid: Pearson 0.76-0.88 over six seeds on 360 real masks), and the mean of four beats every
one of them (0.89; five or six members give no more; BENCHMARKS.md section 6). A user who trains
one g cannot tell a poor draw from a good one, so `--seeds N` trades N times the training time
for that variance; about four is enough.

Each member trains in its own folder `seed-<s>/` with its own resume state. A member that finished
with the options asked for now (its `quality_result.json` is there, and its last.pt records the
same training options) is not trained again, so an interrupted or cancelled run resumes inside the
member it stopped in; with other options it is resumed (more epochs) or, where its network no
longer fits them, refused, as a single `qgseg quality train` in its folder would be. The ensemble
file is written to `checkpoints/best.pt`, where a single g's best checkpoint would be, so scoring,
guidance and the Slicer panel take it unchanged. Without a validation list in the dataset, each member holds out its own seed's
validation cases.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping

from ..engine.checkpoint import member_dir
from ..engine.events import MemberEvents
from ..fileio import read_json, write_json_atomic
from .train import BEST_FILE, RESULT_FILE

ENSEMBLE_CURVE_FILE = "quality_training_curves.png"


def train_quality_ensemble(source, config, n_seeds: int, run_dir: str | os.PathLike = "runs/quality",
                           events=None, cancel=None, progress: bool = True, device: str = "auto") -> Dict[str, Any]:
    """Train g with seeds config.seed, config.seed + 1, ... (n_seeds of them) and save their
    ensemble as `run_dir/checkpoints/best.pt`. Returns the ensemble's path, the members' results
    and a figure of all members' validation curves."""
    from ..errors import ConfigError
    from . import plots
    from .predictor import load_predictor, save_ensemble
    from .train import HISTORY_FILE, QualityTrainConfig, train_quality_predictor

    if n_seeds < 2:
        raise ConfigError(f"an ensemble needs at least 2 seeds, got {n_seeds}")
    if isinstance(config, Mapping) or config is None:
        config = QualityTrainConfig.from_dict(dict(config or {}))
    run_dir = Path(run_dir)
    seeds = [config.seed + k for k in range(n_seeds)]
    members: List[Dict[str, Any]] = []
    for k, seed in enumerate(seeds):
        folder = member_dir(run_dir, seed)
        member_config = dataclasses.replace(config, seed=seed)
        finished = finished_member(folder, member_config.to_dict())
        if finished is not None:
            members.append(finished)
            continue
        member_events = None if events is None else MemberEvents(events, f"seed {seed} ({k + 1} of {n_seeds}): ")
        members.append(train_quality_predictor(source, member_config, folder,
                                               events=member_events, cancel=cancel, progress=progress,
                                               device=device))
    sources = [str(member_dir(run_dir, seed) / BEST_FILE) for seed in seeds]  # not the results' paths:
    # those are as the run that wrote them was given them, possibly relative to another folder
    ensemble = save_ensemble(run_dir / BEST_FILE, [load_predictor(p) for p in sources], sources)
    histories = {f"seed {seed}": read_json(member_dir(run_dir, seed) / HISTORY_FILE, "member history")["history"]
                 for seed in seeds}
    curves = plots.member_curves(histories, run_dir / ENSEMBLE_CURVE_FILE)
    result = {"best_checkpoint": str(ensemble), "curve": str(curves), "seeds": seeds,
              "members": [{"seed": seed, "best_checkpoint": path, "best_epoch": m["best_epoch"],
                           "best_val_mae": m["best_val_mae"], "best_val_pearson": m["best_val_pearson"],
                           "calibration": m.get("calibration")} for seed, path, m in zip(seeds, sources, members)]}
    write_json_atomic(run_dir / RESULT_FILE, result)
    return result


def finished_member(folder: Path, requested: Dict[str, Any]) -> Dict[str, Any] | None:
    """A member's result if it finished training with the options `requested` (as its last.pt
    records them); None when it has not finished, or finished with other options."""
    from .predictor import read_predictor_file
    from .train import LAST_FILE

    if not (folder / RESULT_FILE).is_file() or not (folder / LAST_FILE).is_file():
        return None
    if read_predictor_file(folder / LAST_FILE).get("train_config") != requested:
        return None
    return read_json(folder / RESULT_FILE, "finished ensemble member")
