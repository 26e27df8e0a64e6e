"""Benchmark configs, the fixed LA split helper and report aggregation (no training here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from QGSegmentationLib.benchmark.config import load_bench_config
from QGSegmentationLib.benchmark.data import make_la_split
from QGSegmentationLib.benchmark.report import config_run_labels, group_runs, render_markdown
from QGSegmentationLib.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "data": {"dataset": "data/dataset.json"},
    "network": "unet", "network_options": {"channels": [4, 8]}, "patch_size": [16, 16, 16],
    "iterations": 10,
    "runs": [{"method": "sup", "seeds": [0, 1]}, {"method": "mt", "guidance": "qar,qw", "seeds": [0, 1, 2]}],
    "quick": {"iterations": 3, "seeds": [0], "methods": ["mt+qar,qw"], "evaluation": {"max_test_cases": 1}},
}


def write_config(tmp_path: Path, data: dict, name: str = "study.yaml") -> Path:
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_configs_parse_and_quick_shrinks_them():
    for name in ("la_cpu", "la_gpu", "tiny"):
        full = load_bench_config(REPO / "bench" / f"{name}.yaml")
        quick = load_bench_config(REPO / "bench" / f"{name}.yaml", quick=True)
        assert len(quick.jobs()) < len(full.jobs())
        assert quick.train_options["iterations"] < full.train_options["iterations"]
    cpu = load_bench_config(REPO / "bench" / "la_cpu.yaml")
    assert cpu.train_options["patch_size"] == [32, 64, 64]
    assert cpu.train_options["network_options"]["channels"] == [16, 32, 64, 128]
    labels = {run.label: run.seeds for run in cpu.runs}
    assert labels["mt+qar,qw"] == (0, 1, 2) and labels["cps+qar,qw"] == (0, 1, 2)
    assert labels["fixmatch+qar,qw"] == (0, 1, 2) and labels["sup"] == (0, 1, 2)


def test_a_named_run_lets_one_method_appear_twice(tmp_path):
    runs = [{"method": "mt"}, {"method": "mt", "name": "mt-metassl", "guidance": "qw",
                               "train": {"ssl": {"heterogeneous_loss": True}}}]
    config = load_bench_config(write_config(tmp_path, {**BASE, "runs": runs}))
    assert [r.label for r in config.runs] == ["mt", "mt-metassl+qw"]
    named = load_bench_config(write_config(tmp_path, {**BASE, "runs": runs}), only=["mt-metassl"]).runs
    assert [r.label for r in named] == ["mt-metassl+qw"]
    assert config.train_config(named[0], 0, dataset="d.json").ssl["heterogeneous_loss"] is True
    with pytest.raises(ConfigError, match="name 'MT/x' must be lower-case"):
        load_bench_config(write_config(tmp_path, {**BASE, "runs": [{"method": "mt", "name": "MT/x"}]}))


def test_fingerprint_settings_ignore_options_left_at_their_default():
    """A study recorded before an option existed still matches when that option is at its default."""
    from QGSegmentationLib.benchmark.config import settings_from_record, settings_of
    from QGSegmentationLib.engine.config import TrainConfig

    cfg = TrainConfig(dataset="d.json", iterations=7)
    assert settings_of(cfg) == {"dataset": "d.json", "iterations": 7}
    recorded = cfg.to_dict()
    del recorded["sync_batchnorm"]                      # an option added after the run was recorded
    assert settings_from_record(TrainConfig, recorded) == settings_of(cfg)
    assert settings_of(TrainConfig(dataset="d.json", iterations=7, sync_batchnorm=True)) != settings_of(cfg)


def test_runs_expand_over_seeds_and_quick_filters(tmp_path):
    path = write_config(tmp_path, BASE)
    config = load_bench_config(path)
    assert [j.key for j in config.jobs()] == [
        "main/sup/seed0", "main/mt+qar,qw/seed0", "main/sup/seed1", "main/mt+qar,qw/seed1", "main/mt+qar,qw/seed2"]
    assert config.quality_seeds() == [0, 1, 2]
    cfg = config.train_config(config.runs[1], 2, dataset="d.json", quality_checkpoint="g.pt")
    assert (cfg.method, cfg.seed, cfg.quality_checkpoint) == ("mt", 2, "g.pt")
    assert cfg.ssl["guidance_qar"] and cfg.ssl["guidance_qw"]
    quick = load_bench_config(path, quick=True)
    assert [j.key for j in quick.jobs()] == ["main/mt+qar,qw/seed0"]
    assert quick.train_options["iterations"] == 3 and quick.evaluation.max_test_cases == 1
    # --set wins over quick; --only keeps runs by method or label
    assert load_bench_config(path, quick=True, overrides=["iterations=5"]).train_options["iterations"] == 5
    assert [r.label for r in load_bench_config(path, only=["sup"]).runs] == ["sup"]
    assert [r.label for r in load_bench_config(path, only=["mt"]).runs] == ["mt+qar,qw"]


@pytest.mark.parametrize("change, message", [
    ({"epochs": 3}, "unknown top-level key"),
    ({"runs": [{"method": "nosuch"}]}, "unknown method 'nosuch'"),
    ({"runs": [{"method": "mt", "guidance": "qx"}]}, "unknown guidance qx"),
    ({"runs": [{"method": "sup", "guidance": "qw"}]}, "cannot use quality guidance"),
    ({"runs": [{"method": "mt", "seeds": [0, 0]}]}, "repeat"),
    ({"runs": [{"method": "mt"}, {"method": "mt"}]}, "listed twice"),
    ({"train": {"method": "mt"}}, "set by the study itself"),
    ({"train": {"learning_rate": 1}}, "learning_rate"),
    ({"runs": [{"method": "mt", "train": {"ssl": {"ema": 0.9}}}]}, "ema"),
    ({"quality": {"epochz": 1}}, "epochz"),
    ({"data": {"dataset": "a.json", "phantom": {}}}, "exactly one source"),
    ({"data": {"la": {"labeled": 8}}}, "'path'"),
    ({"evaluation": {"overlap": 1.5}}, "overlap"),
])
def test_bad_configs_name_the_file_and_the_problem(tmp_path, change, message):
    path = write_config(tmp_path, {**BASE, **change}, name="broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_bench_config(path)
    assert message in info.value.message
    assert "broken.yaml" in info.value.message


def test_only_with_an_unknown_run_lists_the_runs(tmp_path):
    with pytest.raises(ConfigError, match="sup, mt\\+qar,qw"):
        load_bench_config(write_config(tmp_path, BASE), only=["cps"])


@pytest.fixture(scope="module")
def fake_la(tmp_path_factory) -> Path:
    """An LA-like folder: dataset.json with a "training" list of 10 labeled phantom cases."""
    from QGSegmentationLib.data.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("fake_la")
    make_phantom_dataset(root, n_labeled=10, n_unlabeled=0, shape=(8, 12, 12), seed=3)
    desc = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({"labels": desc["labels"], "training": desc["training"][::-1]}))
    return root


def test_la_split_is_fixed_disjoint_and_nested(fake_la, tmp_path):
    from QGSegmentationLib.data.dataset import load_dataset

    three = json.loads(make_la_split(fake_la, tmp_path / "l3", labeled=3, n_test=3, n_val=2, split_seed=1).read_text())
    again = json.loads(make_la_split(fake_la, tmp_path / "l3b", labeled=3, n_test=3, n_val=2, split_seed=1).read_text())
    two = json.loads(make_la_split(fake_la, tmp_path / "l2", labeled=2, n_test=3, n_val=2, split_seed=1).read_text())
    other = json.loads(make_la_split(fake_la, tmp_path / "o", labeled=3, n_test=3, n_val=2, split_seed=2).read_text())
    assert three == {**again, "name": three["name"]}
    sizes = {g: len(three[g]) for g in ("training", "validation", "test", "unlabeled")}
    assert sizes == {"training": 3, "validation": 2, "test": 3, "unlabeled": 2}
    images = [c["image"] for g in ("training", "validation", "test") for c in three[g]] + three["unlabeled"]
    assert len(set(images)) == 10
    assert two["test"] == three["test"] and two["validation"] == three["validation"]
    assert two["training"] == three["training"][:2]
    assert other["test"] != three["test"]  # a different split seed gives a different split
    spec = load_dataset(tmp_path / "l3" / "dataset.json")  # files reachable through the symlinks
    assert all(c.image.is_file() and c.label.is_file() for c in spec.test)
    held = json.loads(make_la_split(fake_la, tmp_path / "h", labeled=3, n_test=3, n_val=2, split_seed=1,
                                    unlabeled_as_test=True).read_text())
    assert held["training"] == three["training"] and held["validation"] == three["validation"]
    assert held["test"][:3] == three["test"] and held["unlabeled"] == []
    assert [c["image"] for c in held["test"][3:]] == three["unlabeled"]
    assert all(c["label"] for c in held["test"])


def test_la_split_folds_test_every_case_once(fake_la, tmp_path):
    split = lambda fold: json.loads(make_la_split(fake_la, tmp_path / f"f{fold}", labeled=3, n_test=3, n_val=2,  # noqa: E731
                                                  split_seed=1, fold=fold).read_text())
    folds = [split(fold) for fold in range(3)]  # 10 cases, 3 test cases each: folds 0-2
    fixed = json.loads(make_la_split(fake_la, tmp_path / "fixed", labeled=3, n_test=3, n_val=2, split_seed=1).read_text())
    assert folds[0] == fixed
    tests = [[c["image"] for c in f["test"]] for f in folds]
    assert len(set(sum(tests, []))) == 9  # disjoint test sets
    for f in folds:
        images = [c["image"] for g in ("training", "validation", "test") for c in f[g]] + f["unlabeled"]
        assert len(set(images)) == 10  # within a fold every case is in exactly one group
    assert folds[1]["validation"] != fixed["validation"] and "fold 1" in folds[1]["name"]
    with pytest.raises(DataError, match="fold 3 does not exist: 10 cases make 3 folds"):
        split(3)


def test_la_split_errors_name_the_file(fake_la, tmp_path):
    with pytest.raises(DataError, match="needs 16"):
        make_la_split(fake_la, tmp_path / "x", labeled=10, n_test=4, n_val=2)
    with pytest.raises(DataError, match="nowhere/dataset.json"):
        make_la_split(tmp_path / "nowhere", tmp_path / "y", labeled=2)


def _record(method, guidance, seed, dice_best, dice_last, hd_best):
    summary = lambda d, h: {"dice": {"mean": d}, "hd95": {"mean": h}}  # noqa: E731
    return {"key": f"main/{method}/seed{seed}", "split": "main", "method": method, "guidance": guidance,
            "label": method + (f"+{','.join(guidance)}" if guidance else ""), "seed": seed, "status": "ok",
            "evaluation": {"best": {"summary": summary(dice_best, hd_best)}, "last": {"summary": summary(dice_last, 9.0)}},
            "train_wall_s": 120.0 * (seed + 1), "step_time_s": 0.5, "peak_memory": {"cpu_rss_mb": 100.0},
            "inference": {"segment_s_median": 1.0, "quality_s_median": None}, "history": []}


def test_report_aggregates_seeds_by_hand():
    runs = [_record("mt", ["qar", "qw"], 0, 0.6, 0.5, 4.0), _record("mt", ["qar", "qw"], 1, 0.8, 0.7, 6.0),
            _record("sup", [], 0, 0.55, 0.45, 7.0)]
    results = {"format": "qgseg-benchmark-results", "study": "hand", "commit": "abc123", "runs": runs,
               "command": ["qgseg", "bench", "x.yaml"], "machine": {"platform": "TestOS", "cpu_count": 2}}
    groups = group_runs(runs)
    assert [g["name"] for g in groups] == ["mt+qar,qw", "sup"]
    text = render_markdown(results, "results.json")
    std = math.sqrt(((0.6 - 0.7) ** 2 + (0.8 - 0.7) ** 2) / 1)          # sample std over 2 seeds
    row = next(line for line in text.splitlines() if line.startswith("| main | mt | qar,qw"))
    assert f"0.700 ± {std:.3f}" in row and "5.00 ± 1.41" in row and "0.600 ± 0.141" in row
    assert "3.0 ± 1.4" in row                                          # (2 + 4) / 2 minutes
    sup_row = next(line for line in text.splitlines() if line.startswith("| main | sup | none"))
    assert "| 1 | 0.550 | 7.00 | 0.450 |" in sup_row                   # one seed: no ±
    assert "abc123" in text and "`qgseg bench x.yaml`" in text and "TestOS" in text
    assert "--quick` variant" not in text
    named = {**_record("mt", [], 0, 0.5, 0.5, 8.0), "label": "mt-metassl", "key": "main/mt-metassl/seed0"}
    ordered = {**results, "runs": runs + [named],
               "config": {"runs": [{"method": "mt", "name": "mt-metassl"}, "sup", {"method": "mt", "guidance": "qar,qw"}]}}
    assert [g["label"] for g in group_runs(ordered["runs"], config_run_labels(ordered))] == [
        "mt-metassl", "sup", "mt+qar,qw"]                            # a named run is its own row, config order
    speed_row = lambda m, g: {"method": m, "guidance": g, "host_step_s": 1.0, "guided_step_s": 1.1, "ratio": 1.1}  # noqa: E731
    ordered["speed"] = {"methods": [speed_row("mt", ["qar", "qw"]), speed_row("mt-metassl", ["qw"])]}
    ordered["config"]["runs"].insert(0, {"method": "mt", "name": "mt-metassl", "guidance": "qw"})
    text = render_markdown(ordered, "results.json")
    assert "| main | mt-metassl | none | 1 | 0.500 |" in text
    lines = text.splitlines()
    # speed rows and run rows follow the config's run order too, whatever order they were measured in
    assert lines.index("| mt-metassl | qw | 1.0000 | 1.1000 | 1.10 |") < lines.index("| mt | qar,qw | 1.0000 | 1.1000 | 1.10 |")
    keys = [line.split(" | ")[0][2:] for line in lines if line.startswith("| main/")]
    assert keys == ["main/mt-metassl/seed0", "main/sup/seed0", "main/mt/seed0", "main/mt/seed1"]
    quick = render_markdown({**results, "quick": True, "config": {"iterations": 60}}, "results.json")
    assert "**`--quick` variant** (a smoke check, not a result): 60 iterations; runs `main/mt/seed0`, `main/mt/seed1`" in quick


def test_speed_times_each_guided_run_against_the_same_run_without_guidance(tmp_path):
    """Real steps on random batches: a guided run keeps its own `train` overrides (here the
    dual-network method's second network) and is paired with that run minus guidance."""
    import torch

    from QGSegmentationLib.benchmark.speed import measure_speed, speed_methods

    runs = [{"method": "mt"}, {"method": "mt", "guidance": "qw"},
            {"method": "dualnet", "guidance": "qar,qw", "train": {"ssl": {"dualnet_networks": ["unet", "resunet"]}}}]
    data = {**BASE, "runs": runs, "patch_size": [16, 32, 32], "batch_size": 1, "unlabeled_batch_size": 1,
            "speed": {"steps": 2, "warmup": 0, "rounds": 1},
            "quality": {"grid_size": [16, 16, 16], "backbone": "convnet"}}
    config = load_bench_config(write_config(tmp_path, data))
    picked = speed_methods(config)
    assert [r.label for r in picked] == ["mt+qw", "dualnet+qar,qw"]
    rows = measure_speed(config, picked, n_classes=2, device=torch.device("cpu"))
    assert [(r["method"], r["guidance"]) for r in rows] == [("mt", ["qw"]), ("dualnet", ["qar", "qw"])]
    for row in rows:
        assert row["host_steps"] == row["guided_steps"] == 2
        assert row["host_step_s"] > 0 and row["ratio"] == pytest.approx(row["guided_step_s"] / row["host_step_s"])


def test_speed_plans_the_patch_from_the_study_data_when_it_is_auto(tmp_path, phantom_3d):
    """A study without patch_size times the patch its training would plan; without data to plan
    from, the speed test says what it needs."""
    import torch

    from QGSegmentationLib.benchmark.speed import measure_speed, speed_methods
    from QGSegmentationLib.data.planning import plan_for_dataset

    data = {**{k: v for k, v in BASE.items() if k != "patch_size"}, "runs": [{"method": "mt", "guidance": "qw"}],
            "batch_size": 1, "unlabeled_batch_size": 1, "speed": {"steps": 1, "warmup": 0, "rounds": 1},
            "quality": {"grid_size": [16, 16, 16], "backbone": "convnet"}}
    config = load_bench_config(write_config(tmp_path, data))
    assert config.train_config(speed_methods(config)[0], 0, dataset="d.json").patch_size == "auto"
    with pytest.raises(ConfigError, match="the speed test needs a patch_size"):
        measure_speed(config, speed_methods(config), n_classes=2, device=torch.device("cpu"))
    rows = measure_speed(config, speed_methods(config), n_classes=2, device=torch.device("cpu"), dataset=phantom_3d)
    assert rows[0]["host_steps"] == rows[0]["guided_steps"] == 1
    assert rows[0]["patch_size"] == list(plan_for_dataset(phantom_3d, "3d", "cpu").patch_size)
