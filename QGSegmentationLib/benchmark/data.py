"""Where a study's data comes from: the `data:` section of a benchmark config.

Exactly one source per study, each a registered `DataSource`:

    data: {dataset: path/to/dataset.json}                       # an existing description
    data: {la: {path: ../../shared/data/LA, labeled: [8, 16], split_seed: 2026}}
    data: {phantom: {n_labeled: 3, n_unlabeled: 3, n_validation: 1, n_test: 2}}

A source yields one or more `Split`s (a name and a dataset.json with training / validation / test /
unlabeled lists); the LA source yields one split per labeled count. Relative paths are resolved
against the config file's folder, so a config works from any working directory. Generated files
(the LA split descriptions, the phantom volumes) go under `<study>/data/`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping

import numpy as np

from ..errors import ConfigError, DataError
from ..fileio import read_json, write_json_atomic
from ..registry import Registry

DATA_SOURCES = Registry("benchmark data source")

LA_DEFAULTS = {"labeled": 8, "n_test": 16, "n_validation": 4, "split_seed": 2026}
PHANTOM_DEFAULTS = {"n_labeled": 3, "n_unlabeled": 3, "n_validation": 1, "n_test": 2,
                    "shape": [16, 24, 24], "n_classes": 2, "seed": 0}


@dataclass(frozen=True)
class Split:
    """One data setting of a study: runs are repeated for every split."""

    name: str
    dataset: Path           # dataset.json


def _resolve(path: str, base_dir: Path) -> Path:
    candidate = Path(os.path.expanduser(str(path)))
    return candidate if candidate.is_absolute() else (base_dir / candidate)


def _check_keys(options: Mapping, allowed, where: str) -> Dict[str, Any]:
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}: expected a mapping of options, got {options!r}")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}")
    return dict(options)


class DataSource:
    """A kind of `data:` entry: `normalise` checks the options (at config load, before any
    training), `split_names` names the splits, `prepare` writes/locates their dataset.json files."""

    def normalise(self, options: Any, where: str) -> Dict[str, Any]:
        raise NotImplementedError

    def split_names(self, options: Mapping) -> List[str]:
        raise NotImplementedError

    def prepare(self, options: Mapping, base_dir: Path, data_dir: Path) -> List[Split]:
        raise NotImplementedError


@DATA_SOURCES.register("dataset", description="an existing dataset.json (paths relative to the config)")
class DatasetFile(DataSource):
    def normalise(self, options, where):
        if isinstance(options, Mapping):
            options = _check_keys(options, {"path"}, where).get("path")
        if not isinstance(options, str) or not options.strip():
            raise ConfigError(f"{where}: expected the path of a dataset.json, got {options!r}")
        return {"path": options}

    def split_names(self, options):
        return ["main"]

    def prepare(self, options, base_dir, data_dir):
        path = _resolve(options["path"], base_dir)
        if path.is_dir():
            path = path / "dataset.json"
        if not path.is_file():
            raise DataError(f"{path}: dataset description not found (data.dataset of the benchmark config)")
        return [Split("main", path)]


@DATA_SOURCES.register("la", description="the LA dataset with the fixed benchmark split")
class LASplit(DataSource):
    def normalise(self, options, where):
        opts = {**LA_DEFAULTS, **_check_keys(options, set(LA_DEFAULTS) | {"path"}, where)}
        if not isinstance(opts.get("path"), str):
            raise ConfigError(f"{where}: 'path' (the LA folder holding dataset.json) is required")
        labeled = opts["labeled"]
        labeled = [labeled] if isinstance(labeled, int) else labeled
        if not isinstance(labeled, list) or not labeled or not all(isinstance(n, int) and n >= 1 for n in labeled):
            raise ConfigError(f"{where}: 'labeled' must be a positive integer or a list of them, got {opts['labeled']!r}")
        opts["labeled"] = sorted(set(labeled))
        for key in ("n_test", "n_validation", "split_seed"):
            if not isinstance(opts[key], int) or opts[key] < (0 if key == "split_seed" else 1):
                raise ConfigError(f"{where}: '{key}' must be a {'non-negative' if key == 'split_seed' else 'positive'} "
                                  f"integer, got {opts[key]!r}")
        return opts

    def split_names(self, options):
        return [f"labeled{n}" for n in options["labeled"]]

    def prepare(self, options, base_dir, data_dir):
        root = _resolve(options["path"], base_dir)
        return [Split(f"labeled{n}", make_la_split(root, data_dir / f"la_labeled{n}", n, options["n_test"],
                                                   options["n_validation"], options["split_seed"]))
                for n in options["labeled"]]


@DATA_SOURCES.register("phantom", description="synthetic phantoms generated into the study folder")
class PhantomData(DataSource):
    def normalise(self, options, where):
        opts = {**PHANTOM_DEFAULTS, **_check_keys(options or {}, set(PHANTOM_DEFAULTS), where)}
        for key in ("n_labeled", "n_unlabeled", "n_validation", "n_test", "n_classes", "seed"):
            if not isinstance(opts[key], int) or opts[key] < 0:
                raise ConfigError(f"{where}: '{key}' must be a non-negative integer, got {opts[key]!r}")
        if opts["n_labeled"] < 1 or opts["n_test"] < 1 or opts["n_classes"] < 2:
            raise ConfigError(f"{where}: need n_labeled >= 1, n_test >= 1 and n_classes >= 2")
        shape = opts["shape"]
        if not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(s, int) and s >= 8 for s in shape):
            raise ConfigError(f"{where}: 'shape' must be three integers >= 8 (z y x), got {shape!r}")
        return opts

    def split_names(self, options):
        return ["phantom"]

    def prepare(self, options, base_dir, data_dir):
        from ..data.phantom import make_phantom_dataset

        root = data_dir / "phantom"
        stamp = root / "phantom_options.json"
        dataset = root / "dataset.json"
        if not (dataset.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == dict(options)):
            make_phantom_dataset(root, n_labeled=options["n_labeled"], n_unlabeled=options["n_unlabeled"],
                                 n_validation=options["n_validation"], n_test=options["n_test"],
                                 shape=tuple(options["shape"]), n_classes=options["n_classes"],
                                 seed=options["seed"])
            write_json_atomic(stamp, dict(options))
        return [Split("phantom", dataset)]


def normalise_data_section(section: Any, where: str) -> Dict[str, Any]:
    """{source name: normalised options} with exactly one source."""
    if not isinstance(section, Mapping) or len(section) != 1:
        raise ConfigError(f"{where}: 'data' must name exactly one source ({', '.join(DATA_SOURCES.names())}), "
                          f"e.g. data: {{dataset: path/to/dataset.json}}; got {section!r}")
    (kind, options), = section.items()
    source = DATA_SOURCES.get(kind)()
    return {str(kind).lower(): source.normalise(options, f"{where}: data.{kind}")}


def split_names(section: Mapping) -> List[str]:
    (kind, options), = section.items()
    return DATA_SOURCES.get(kind)().split_names(options)


def prepare_splits(section: Mapping, base_dir: Path, data_dir: Path) -> List[Split]:
    (kind, options), = section.items()
    return DATA_SOURCES.get(kind)().prepare(options, Path(base_dir), Path(data_dir))


def make_la_split(la: Path, out: Path, labeled: int, n_test: int = 16, n_val: int = 4,
                  split_seed: int = 2026, unlabeled_as_test: bool = False, fold: int = 0) -> Path:
    """Write `out/dataset.json` for the LA benchmark with a fixed split, next to symlinks to the data.

    Over the LA dataset.json's cases sorted by image path and shuffled with `split_seed`: the first
    `n_test` are test cases (never used for training, selection or tuning), the next `n_val`
    validation (checkpoint selection), then `labeled` labeled training cases; all remaining cases
    are listed as unlabeled. The split therefore does not depend on `labeled`: the 8-labeled cases
    are the first 8 of the 16-labeled ones, and test/validation are identical. Same logic as
    bench/make_la_split.py. The LA files are referenced through symlinks, never copied.

    `unlabeled_as_test` appends the would-be unlabeled cases, with their labels, to the test cases
    and leaves "unlabeled" empty: a larger held-out set for evaluating models that never saw those
    cases (supervised segmenters, quality predictors). Never train an SSL method on this split's
    sibling and then evaluate it here: it trained on those images.

    `fold` k rotates the shuffled order by k * `n_test` cases before the split is taken, so folds
    0 .. len(cases) // n_test - 1 have disjoint test sets (cross-validation; with 80 LA cases and 16
    test cases, five folds test every case once). Fold 0 is the fixed split above, unchanged."""
    la, out = Path(la), Path(out)
    source = la / "dataset.json"
    desc = read_json(source, "LA dataset description (data.la.path of the benchmark config)")
    cases = desc.get("training") if isinstance(desc, dict) else None
    if not isinstance(cases, list) or not all(isinstance(c, dict) and "image" in c and "label" in c for c in cases):
        raise DataError(f"{source}: expected a \"training\" list of {{\"image\", \"label\"}} entries")
    needed = n_test + n_val + labeled
    if len(cases) < needed:
        raise DataError(f"{source}: {len(cases)} labeled cases, but the split needs {needed} "
                        f"({n_test} test + {n_val} validation + {labeled} labeled)")
    folds = len(cases) // n_test
    if not isinstance(fold, int) or not 0 <= fold < folds:
        raise DataError(f"{source}: fold {fold} does not exist: {len(cases)} cases make {folds} folds of "
                        f"{n_test} test cases (0 to {folds - 1})")
    cases = sorted(cases, key=lambda c: c["image"])
    order = np.roll(np.random.default_rng(split_seed).permutation(len(cases)), -fold * n_test)
    shuffled = [cases[i] for i in order]
    test, val, train = shuffled[:n_test], shuffled[n_test:n_test + n_val], shuffled[n_test + n_val:]
    out.mkdir(parents=True, exist_ok=True)
    folders = sorted({Path(c[key]).parts[0] for c in cases for key in ("image", "label") if len(Path(c[key]).parts) > 1})
    for sub in folders:
        _link(la / sub, out / sub)
    entry = lambda c: {"image": c["image"], "label": c["label"]}  # noqa: E731
    rest = train[labeled:]
    held_out = test + rest if unlabeled_as_test else test
    split = {
        "name": f"LA split seed {split_seed}{f', fold {fold}' if fold else ''}: {labeled} labeled"
                + (", unlabeled cases held out as test" if unlabeled_as_test else ""),
        "labels": desc["labels"],
        "training": [entry(c) for c in train[:labeled]],
        "validation": [entry(c) for c in val],
        "test": [entry(c) for c in held_out],
        "unlabeled": [] if unlabeled_as_test else [c["image"] for c in rest],
    }
    return write_json_atomic(out / "dataset.json", split)


def _link(target: Path, link: Path) -> None:
    """A symlink `link` -> `target` (absolute), replacing a stale link; never replaces a real folder."""
    target = Path(os.path.abspath(target))
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return
        link.unlink()
    elif link.exists():
        raise DataError(f"{link}: exists and is not a link to {target}; remove it or use another study folder")
    os.symlink(target, link)
