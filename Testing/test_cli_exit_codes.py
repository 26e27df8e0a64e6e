"""The `qgseg` command line: --help teaches, bad input -> 2, cancel -> 3, out of memory -> 4."""

from __future__ import annotations

import argparse
import json

import pytest

from QGSegmentationLib.engine.events import read_events, validate_stream

from conftest import run_cli


def test_help_lists_commands_and_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from QGSegmentationLib.cli.main import build_parser; build_parser(); "
            "print('torch' in sys.modules, 'monai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
    res = run_cli("--help")
    assert res.returncode == 0
    for command in ("train", "predict", "evaluate", "demo", "ssl"):
        assert command in res.stdout


@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "demo"])
def test_each_command_has_help_with_examples(command):
    res = run_cli(command, "--help")
    assert res.returncode == 0 and "usage: qgseg" in res.stdout


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _all_parsers(child)


def test_help_shows_real_defaults_and_never_a_meaningless_one():
    from QGSegmentationLib.cli.main import build_parser

    helps = {p.prog: " ".join(p.format_help().split()) for p in _all_parsers(build_parser())}
    assert len(helps) >= 12
    for prog, text in helps.items():
        assert "(default: None)" not in text and "(default: [])" not in text, prog
    assert "(default: 0.5)" in helps["qgseg predict"]  # a real default is still shown
    assert "[3d]" in helps["qgseg train"]  # config-backed options keep naming theirs


def test_help_wraps_long_descriptions_and_keeps_examples_verbatim(monkeypatch):
    from QGSegmentationLib.cli.main import build_parser

    monkeypatch.setenv("COLUMNS", "100")
    parsers = {p.prog: p for p in _all_parsers(build_parser())}
    for prog, parser in parsers.items():
        for line in parser.format_help().splitlines():
            assert len(line) <= 100 or line.startswith("  "), (prog, line)  # only indented examples may run long
    train_help = parsers["qgseg train"].format_help()
    assert "--method names an SSL method" in " ".join(train_help.split())
    assert "  qgseg train --dataset" in train_help  # an example line, indentation kept


def test_help_rewraps_prose_paragraphs_evenly_on_a_narrow_terminal(monkeypatch):
    from QGSegmentationLib.cli.common import HelpFormatter

    monkeypatch.setenv("COLUMNS", "60")
    source = ("Defaults: paper settings (AdamW 3e-4, cosine warm restarts, SmoothL1),\n"  # 70 > 58 wide
              "early stop on validation MAE, 50 masks per case per epoch on a GPU.\n"
              "Short line kept.\n"
              "\n"
              "Examples:\n"
              "  qgseg quality train --dataset Task/dataset.json --run-dir runs/g --epochs 40 --backbone resnet18\n")
    parser = argparse.ArgumentParser(prog="x", epilog=source, formatter_class=HelpFormatter)
    epilog = parser.format_help().split("Defaults:", 1)[1]
    lines = ("Defaults:" + epilog).splitlines()
    prose = lines[:lines.index("Short line kept.")]
    assert len(prose) >= 3 and all(len(line) <= 58 for line in prose)
    assert all(len(line) >= 40 for line in prose[:-1]), prose  # even lines, no short stubs mid-paragraph
    assert " ".join(prose) == " ".join(source.split("\nShort")[0].split())  # same words, same order
    assert "  qgseg quality train --dataset Task/dataset.json --run-dir runs/g --epochs 40 --backbone resnet18" in lines


def test_missing_dataset_exits_2_with_clear_error(tmp_path):
    missing = tmp_path / "nope" / "dataset.json"
    res = run_cli("train", "--dataset", str(missing), "--run-dir", str(tmp_path / "r"),
                  "--events", str(tmp_path / "ev.jsonl"), "--quiet")
    assert res.returncode == 2
    assert str(missing) in res.stderr or "dataset.json" in res.stderr
    events = read_events(tmp_path / "ev.jsonl")
    validate_stream(events)
    error = next(e for e in events if e["event"] == "error")
    assert error["kind"] == "data"
    assert events[-1]["status"] == "failed" and events[-1]["exit_code"] == 2
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())  # failed runs say so too
    assert manifest["status"] in ("failed", "interrupted") and manifest["config"]["dataset"] == str(missing)


def test_training_without_validation_cases_exits_2_before_anything_is_trained(tmp_path):
    from QGSegmentationLib.data.phantom import make_phantom_dataset

    dataset = make_phantom_dataset(tmp_path / "ds", n_labeled=3, n_unlabeled=0, n_test=0, shape=(16, 32, 32))
    res = run_cli("train", "--dataset", str(dataset), "--n-validation", "0", "--patch", "16", "32", "32",
                  "--run-dir", str(tmp_path / "r"), "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(dataset) in res.stderr and "no validation cases" in res.stderr and "--n-validation" in res.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_two_labeled_cases_train_on_one_and_validate_on_the_other_and_one_case_is_refused(tmp_path):
    from QGSegmentationLib.data.phantom import make_phantom_dataset

    two = make_phantom_dataset(tmp_path / "two", n_labeled=2, n_unlabeled=0, n_test=0, shape=(16, 32, 32))
    res = run_cli("train", "--dataset", str(two), "--patch", "16", "32", "32", "--iterations", "2",
                  "--run-dir", str(tmp_path / "r2"), "--quiet")
    assert res.returncode == 0, res.stderr
    split = json.loads((tmp_path / "r2" / "split.json").read_text())
    assert len(split["training"]) == 1 and len(split["validation"]) == 1
    one = make_phantom_dataset(tmp_path / "one", n_labeled=1, n_unlabeled=0, n_test=0, shape=(16, 32, 32))
    res = run_cli("train", "--dataset", str(one), "--run-dir", str(tmp_path / "r1"), "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(one) in res.stderr and "at least one must remain" in res.stderr and "label one more" in res.stderr
    assert not (tmp_path / "r1" / "checkpoints").exists()


def test_bad_option_value_exits_2(phantom_3d, tmp_path):
    res = run_cli("train", "--dataset", str(phantom_3d), "--patch", "16", "32", "--run-dir", str(tmp_path / "r"), "--quiet")
    assert res.returncode == 2 and "patch_size" in res.stderr


def test_cuda_requested_without_gpu_is_reported(phantom_3d, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = run_cli("train", "--dataset", str(phantom_3d), "--device", "cuda", "--run-dir", str(tmp_path / "r"),
                  "--json", "--quiet")
    assert res.returncode == 2
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert any(e["event"] == "error" and e["kind"] == "cuda_unavailable" for e in events)


def test_injected_out_of_memory_exits_4_with_kind_oom(phantom_3d, tmp_path):
    res = run_cli("train", "--dataset", str(phantom_3d), "--patch", "16", "32", "32", "--iterations", "2",
                  "--run-dir", str(tmp_path / "r"), "--events", str(tmp_path / "ev.jsonl"), "--quiet",
                  "--set", "network_options={channels: [4, 8, 16]}", env={"QGSEG_INJECT_FAULT": "oom"})
    assert res.returncode == 4, res.stderr
    events = read_events(tmp_path / "ev.jsonl")
    error = next(e for e in events if e["event"] == "error")
    assert error["kind"] == "oom" and "patch" in error["hint"]
    assert events[-1]["exit_code"] == 4


def test_cancel_file_before_start_exits_3(phantom_3d, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "CANCEL").write_text("stop")
    res = run_cli("train", "--dataset", str(phantom_3d), "--patch", "16", "32", "32", "--iterations", "5",
                  "--run-dir", str(run_dir), "--events", str(tmp_path / "ev.jsonl"), "--quiet",
                  "--set", "network_options={channels: [4, 8, 16]}")
    assert res.returncode == 3, res.stderr
    events = read_events(tmp_path / "ev.jsonl")
    assert events[-1]["status"] == "cancelled"
    assert (run_dir / "checkpoints" / "last.pt").exists()
