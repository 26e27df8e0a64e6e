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
    assert manifest["status"] == "failed" and manifest["config"]["dataset"] == str(missing)


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


def training_in_progress(dataset, tmp_path):
    """A 400-iteration `qgseg train` child process, returned once it reports progress (it checks
    its cancel file and Ctrl-C from then on), with its arguments, run folder and events file."""
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO

    run_dir, events = tmp_path / "r", tmp_path / "ev.jsonl"
    args = ["train", "--dataset", str(dataset), "--patch", "16", "32", "32", "--iterations", "400",
            "--val-every", "400", "--run-dir", str(run_dir), "--events", str(events), "--quiet",
            "--set", "network_options={channels: [4, 8, 16]}", "--set", "checkpoint_every=1000"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "QGSegmentationLib.cli.main", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (events.exists() and any(e["event"] == "progress" for e in read_events(events))):
        time.sleep(0.05)
    return proc, args, run_dir, events


def test_a_cancel_file_stops_the_run_and_one_left_behind_does_not_stop_the_rerun(phantom_3d, tmp_path):
    """CANCEL written during a run: exit 3, last.pt saved, a message saying how to go on. The same
    command again, with that file still there (older than the new process), removes it, says so on
    the terminal (not only in the event stream), and resumes to the end."""
    import os
    import time

    from QGSegmentationLib.engine.checkpoint import load_checkpoint

    proc, args, run_dir, events = training_in_progress(phantom_3d, tmp_path)
    (run_dir / "CANCEL").write_text("stop")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 3, stderr
    assert f"qgseg: cancelled: stopped by the cancel file {run_dir / 'CANCEL'}" in stderr
    assert "run the same command again to resume" in stderr
    assert read_events(events)[-1]["status"] == "cancelled"
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"]
    assert 0 < stopped_at < 400

    os.utime(run_dir / "CANCEL", (time.time() - 5, time.time() - 5))  # as the stopped run left it
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert f"warning: removed {run_dir / 'CANCEL'}, left by an earlier cancelled run" in res.stderr
    assert f"warning: resuming from {run_dir / 'checkpoints' / 'last.pt'} at iteration {stopped_at}" in res.stderr
    assert not (run_dir / "CANCEL").exists()


@pytest.mark.parametrize("signal_name,said", [("SIGINT", "Ctrl-C"), ("SIGTERM", "SIGTERM")])
def test_ctrl_c_saves_a_checkpoint_at_the_next_step_and_exits_3(phantom_3d, tmp_path, signal_name, said):
    """The first Ctrl-C (SIGINT) in a training loop works like the cancel file: the step running
    finishes, last.pt is saved at the iteration reached (not the last periodic checkpoint), and the
    command exits 3 saying how to resume. So does SIGTERM, which a cluster's scheduler (SLURM, at
    the end of a job's time) and `kill` send before they kill."""
    import signal

    from QGSegmentationLib.engine.checkpoint import load_checkpoint

    proc, _, run_dir, events = training_in_progress(phantom_3d, tmp_path)
    proc.send_signal(getattr(signal, signal_name))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 3, stderr
    assert f"{said}: stopping after this step" in stderr and f"qgseg: cancelled: stopped by {said}" in stderr
    assert read_events(events)[-1]["status"] == "cancelled"
    assert 10 <= load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] < 400


def test_resuming_a_run_folder_with_another_network_method_or_labels_exits_2(phantom_3d, phantom_multiclass, tmp_path):
    """A rerun into a run folder whose last.pt holds another model is refused before any data is
    read, naming what differs; the same options resume as before."""
    run_dir = tmp_path / "r"
    common = ["--patch", "16", "32", "32", "--iterations", "2", "--val-every", "2", "--quiet",
              "--run-dir", str(run_dir), "--set", "network_options={channels: [4, 8, 16]}"]
    first = run_cli("train", "--dataset", str(phantom_3d), *common)
    assert first.returncode == 0, first.stderr
    manifest = (run_dir / "manifest.json").read_text()  # the finished run's record, kept by every refusal
    for changed, what in ((["--dataset", str(phantom_3d), "--network", "basicunet"], "network 'unet' there, 'basicunet' now"),
                          (["--dataset", str(phantom_3d), "--method", "cps"], "method 'sup' there, 'cps' now"),
                          (["--dataset", str(phantom_multiclass)], "labels ")):
        res = run_cli("ssl", "train", *changed, *common)
        assert res.returncode == 2, res.stderr
        assert "holds a training of another model" in res.stderr and what in res.stderr, res.stderr
        assert "choose another --run-dir" in res.stderr
        assert (run_dir / "manifest.json").read_text() == manifest
    again = run_cli("train", "--dataset", str(phantom_3d), *common[:-2], "--iterations", "3", *common[-2:])
    assert again.returncode == 0, again.stderr


def tiny_segmenter_checkpoint(path):
    """A loadable segmenter checkpoint of an untrained tiny 3D U-Net (no training needed)."""
    import dataclasses

    import torch

    from QGSegmentationLib.data.preprocess import PreprocessConfig
    from QGSegmentationLib.engine.checkpoint import FORMAT, save_checkpoint
    from QGSegmentationLib.networks import build_network

    options = {"channels": [4, 8, 16], "num_res_units": 0}
    torch.manual_seed(0)
    net = build_network("unet", 3, 1, 2, img_size=(8, 16, 16), **options)
    return save_checkpoint(path, {
        "format": FORMAT, "config": {"network": "unet", "network_options": options}, "mode": "3d",
        "inference_networks": [0], "network_names": ["unet"], "patch_size": [8, 16, 16], "n_classes": 2,
        "networks": [net.state_dict()], "labels": {"0": "background", "1": "organ"},
        "preprocess": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in dataclasses.asdict(PreprocessConfig()).items()}})


@pytest.fixture
def nrrd_images(tmp_path):
    """A folder of two small .nrrd images, and a segmenter checkpoint to run on them."""
    from QGSegmentationLib.data.io import Geometry, write_image
    from QGSegmentationLib.data.phantom import make_phantom_case

    folder = tmp_path / "images"
    for i in range(2):
        image, _ = make_phantom_case((8, 16, 16), seed=i)
        write_image(folder / f"case_{i}.nrrd", image, Geometry.identity(image.shape))
    return folder, tiny_segmenter_checkpoint(tmp_path / "best.pt")


def test_predict_into_its_input_folder_is_refused_before_anything_is_overwritten(nrrd_images, tmp_path):
    folder, checkpoint = nrrd_images
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    res = run_cli("predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(folder),
                  "--no-mirror", "--run-dir", str(tmp_path / "r"), "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert str(folder / "case_0.nrrd") in res.stderr and "overwrite the input image" in res.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written, nothing replaced
    one = folder / "case_1.nrrd"  # an output path given as a single input file clashes too
    res = run_cli("predict", "--checkpoint", str(checkpoint), "--input", str(one), "--output", str(folder / "."),
                  "--no-mirror", "--run-dir", str(tmp_path / "r2"), "--quiet")
    assert res.returncode == 2 and str(one) in res.stderr, res.stderr
    res = run_cli("predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(tmp_path / "p"),
                  "--no-mirror", "--run-dir", str(tmp_path / "r3"), "--quiet")
    assert res.returncode == 0, res.stderr  # another folder is fine
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "case_0.nrrd", "case_0.seg.nrrd", "case_1.nrrd", "case_1.seg.nrrd"]


def test_predict_checks_every_input_before_it_writes_anything(nrrd_images, tmp_path):
    """A second input that is no image used to stop predict after the first case's outputs were
    written. (Headers are checked up front; voxels that turn out unreadable still stop it later.)"""
    folder, checkpoint = nrrd_images
    (folder / "case_1.nrrd").write_bytes(b"NRRD0004\ntype: what\n")  # not an image
    out = tmp_path / "existing_output"
    out.mkdir()
    res = run_cli("predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(out),
                  "--no-mirror", "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert str(folder / "case_1.nrrd") in res.stderr
    assert list(out.iterdir()) == []

def test_predict_to_an_existing_file_exits_2_before_inference(nrrd_images, tmp_path):
    folder, checkpoint = nrrd_images
    taken = tmp_path / "preds.txt"
    taken.write_text("not a folder")
    for output, problem in ((taken, "the output folder is an existing file"), (taken / "sub", f"{taken} is a file")):
        res = run_cli("predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(output),
                      "--no-mirror", "--run-dir", str(tmp_path / "r"), "--events", str(tmp_path / "ev.jsonl"),
                      "--quiet")
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert str(output) in res.stderr and problem in res.stderr, res.stderr
        events = read_events(tmp_path / "ev.jsonl")
        assert not [e for e in events if e["event"] == "case_done"]  # failed before the first case
    assert taken.read_text() == "not a folder"


def test_predict_records_its_run_in_the_output_folder_and_a_refused_command_leaves_nothing(nrrd_images, tmp_path):
    """Without --run-dir, predict's manifest.json goes beside its segmentations (not into a new
    runs/predict-<time>/ of the working folder), and a command refused for bad input leaves no
    folder and no manifest behind: not runs/<command>-<time>/, not one in the user's image folder."""
    folder, checkpoint = nrrd_images
    work = tmp_path / "work"
    work.mkdir()
    res = run_cli("predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", "preds",
                  "--no-mirror", "--quiet", cwd=work)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((work / "preds" / "manifest.json").read_text())
    assert manifest["command"][:2] == ["qgseg", "predict"] and manifest["status"] == "ok"
    assert sorted(p.name for p in work.iterdir()) == ["preds"]
    before = sorted(p.name for p in folder.iterdir())
    refused = [("predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(folder)),
               ("predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", "x.nii.gz"),
               ("evaluate", "--predictions", "missing", "--dataset", "missing.json"),
               ("train", "--dataset", "missing.json"),
               ("quality", "score", "--checkpoint", "missing.pt", "--images", "a.nrrd", "--masks", "b.nrrd",
                "--output", "scores.csv")]
    for command in refused:
        res = run_cli(*command, "--quiet", cwd=work)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (command, res.stderr)
        assert sorted(p.name for p in work.iterdir()) == ["preds"], command
        assert sorted(p.name for p in folder.iterdir()) == before, command


def test_guidance_without_a_quality_predictor_is_refused_before_the_run_folder_fills(phantom_3d, tmp_path):
    """Refused before planning and case loading wrote plan.json and split.json into a new
    runs/ssl-train-<time>/, which therefore used to stay behind."""
    work = tmp_path / "work"
    work.mkdir()
    res = run_cli("ssl", "train", "--dataset", str(phantom_3d), "--method", "mt", "--guidance", "qar,qw",
                  "--iterations", "2", "--quiet", cwd=work)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--quality-checkpoint" in res.stderr and "qgseg quality train" in res.stderr
    assert list(work.iterdir()) == []


def test_a_run_folder_that_cannot_be_made_exits_2_naming_it(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    res = run_cli("train", "--dataset", str(tmp_path / "ds.json"), "--run-dir", str(taken / "r"), "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{taken / 'r'}: cannot create the run folder" in res.stderr


def test_a_quality_predictor_of_other_classes_is_refused_before_anything_is_segmented_or_trained(
        nrrd_images, phantom_3d, tmp_path):
    """g trained for two foreground classes cannot score a binary segmenter's masks, nor guide a
    binary training: exit 2 at once, naming both, instead of wrong scores or a crash hours later
    when QAR switches on."""
    from QGSegmentationLib.quality.predictor import QualityPredictor, predictor_config, save_predictor

    folder, checkpoint = nrrd_images
    g = save_predictor(tmp_path / "g2.pt", QualityPredictor(predictor_config(
        n_foreground=2, grid_size=(16, 16, 16), class_names=["liver", "tumour"])).eval())
    res = run_cli("predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(tmp_path / "p"),
                  "--quality-checkpoint", str(g), "--no-mirror", "--run-dir", str(tmp_path / "r"), "--quiet")
    assert res.returncode == 2, res.stderr
    assert f"{g}: this quality predictor scores 2 foreground class(es), but --checkpoint has 1" in res.stderr
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())
    res = run_cli("ssl", "train", "--dataset", str(phantom_3d), "--method", "mt", "--guidance", "qar,qw",
                  "--quality-checkpoint", str(g), "--patch", "16", "32", "32", "--iterations", "2",
                  "--run-dir", str(tmp_path / "t"), "--quiet")
    assert res.returncode == 2, res.stderr
    assert "scores 2 foreground class(es), but the dataset has 1" in res.stderr
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_training_checks_every_file_first_and_warns_of_empty_labels_and_unused_classes(tmp_path):
    """Every file is opened before training: two bad label maps are reported together (not one per
    run), and an all-background training label or a declared class no label map holds is a
    warning on the terminal."""
    import json

    import numpy as np

    from QGSegmentationLib.data.io import read_label, write_label
    from QGSegmentationLib.data.phantom import make_phantom_dataset

    dataset = make_phantom_dataset(tmp_path / "d", n_labeled=3, n_unlabeled=0, shape=(16, 32, 32), seed=2)
    description = json.loads(dataset.read_text())
    description["labels"]["2"] = "lesion"
    dataset.write_text(json.dumps(description))
    labels = [dataset.parent / case["label"] for case in description["training"]]
    label, geometry = read_label(labels[0])
    write_label(labels[0], np.zeros_like(label), geometry)
    common = ["--patch", "16", "32", "32", "--iterations", "1", "--val-every", "1", "--quiet",
              "--set", "network_options={channels: [4, 8, 16]}"]
    res = run_cli("train", "--dataset", str(dataset), "--run-dir", str(tmp_path / "r"), *common)
    assert res.returncode == 0, res.stderr
    assert f"warning: {labels[0]}: label map is empty (background only)" in res.stderr
    assert "warning: class 2 ('lesion') never occurs in any label map" in res.stderr
    for path in labels[1:]:
        write_label(path, np.full_like(label, 7), geometry)
    res = run_cli("train", "--dataset", str(dataset), "--run-dir", str(tmp_path / "r2"), *common)
    assert res.returncode == 2, res.stderr
    assert all(str(path) in res.stderr for path in labels[1:]), res.stderr


def test_predict_warns_of_scores_it_will_not_rewrite_and_evaluate_names_a_file_given_as_folder(nrrd_images, tmp_path):
    folder, checkpoint = nrrd_images
    out = tmp_path / "p"
    out.mkdir()
    (out / "scores.csv").write_text("case,segment,label,predicted_quality\ncase_0,1,foreground,0.9\n")
    res = run_cli("predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(out),
                  "--no-mirror", "--run-dir", str(tmp_path / "r"), "--quiet")
    assert res.returncode == 0, res.stderr
    assert f"warning: {out / 'scores.csv'} is left from an earlier predict into this folder" in res.stderr
    res = run_cli("evaluate", "--predictions", str(out / "case_0.nrrd"), "--references", str(folder),
                  "--run-dir", str(tmp_path / "e"), "--quiet")
    assert res.returncode == 2 and "case_0.nrrd: a file: pass the folder that holds the predictions" in res.stderr


def test_predict_writes_nifti_label_maps_on_request_on_the_inputs_grid(nrrd_images, tmp_path):
    """--format nii.gz: <case>.nii.gz label maps (what nnU-Net and MONAI users read) on exactly the
    input's grid, beside the Slicer .seg.nrrd; an --output named like an image file is refused."""
    from QGSegmentationLib.data.io import read_geometry, read_label

    folder, checkpoint = nrrd_images
    out = tmp_path / "p"
    res = run_cli("predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(out),
                  "--format", "nii.gz", "--no-mirror", "--run-dir", str(tmp_path / "r"), "--quiet")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["case_0.nii.gz", "case_0.seg.nrrd", "case_1.nii.gz", "case_1.seg.nrrd"]
    for case in ("case_0", "case_1"):
        _, geometry = read_label(out / f"{case}.nii.gz")
        assert geometry.almost_equal(read_geometry(folder / f"{case}.nrrd"), tol=1e-6)
    res = run_cli("predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(tmp_path / "x.nii.gz"),
                  "--no-mirror", "--run-dir", str(tmp_path / "r2"), "--quiet")
    assert res.returncode == 2 and "name a folder, not an image file" in res.stderr, res.stderr
    assert not (tmp_path / "x.nii.gz").exists()


def test_a_guided_run_too_short_for_its_schedule_says_so_with_a_schedule_that_fits(phantom_3d, tmp_path):
    from QGSegmentationLib.quality.predictor import QualityPredictor, predictor_config, save_predictor

    g = save_predictor(tmp_path / "g.pt", QualityPredictor(predictor_config(n_foreground=1, grid_size=(16, 16, 16))).eval())
    common = ["ssl", "train", "--dataset", str(phantom_3d), "--method", "mt", "--quality-checkpoint", str(g),
              "--patch", "16", "32", "32", "--iterations", "4", "--val-every", "4", "--iterations-per-epoch", "1",
              "--quiet", "--set", "network_options={channels: [4, 8, 16]}"]
    res = run_cli(*common, "--guidance", "qar,qw", "--run-dir", str(tmp_path / "a"))
    assert res.returncode == 0, res.stderr
    assert ("warning: this run is 4 epochs of 1 iterations, shorter than the quality guidance schedule: by its end "
            "QAR 0% of its weight, QW 0% of its weight. The QG-SSL paper's schedule scaled to this run: "
            "--set ssl.qar_delay_epochs=0.6 --set ssl.qar_rampup_epochs=0.8 --set ssl.qw_delay_epochs=0.3 "
            "--set ssl.qw_rampup_epochs=0.6") in res.stderr
    fitted = ["--set", "ssl.qar_delay_epochs=0.6", "--set", "ssl.qar_rampup_epochs=0.8",
              "--set", "ssl.qw_delay_epochs=0.3", "--set", "ssl.qw_rampup_epochs=0.6"]
    res = run_cli(*common, "--guidance", "qar,qw", *fitted, "--run-dir", str(tmp_path / "b"))
    assert res.returncode == 0 and "quality guidance schedule" not in res.stderr, res.stderr


def test_an_output_that_cannot_be_written_exits_2_naming_it(phantom_3d, tmp_path):
    """A folder where the output file should go, or a folder under a file, used to end in
    IsADirectoryError or FileNotFoundError tracebacks (exit 1) from the atomic write."""
    from QGSegmentationLib.errors import DataError
    from QGSegmentationLib.fileio import write_text_atomic

    folder = tmp_path / "outs"
    folder.mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for target, why in ((folder, "a folder of that name exists"), (blocker / "plan.json", "cannot write it")):
        with pytest.raises(DataError, match=why):
            write_text_atomic(target, "text")
    res = run_cli("plan", "--dataset", str(phantom_3d), "--output", str(folder))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{folder}: cannot write it (a folder of that name exists" in res.stderr
    assert list(folder.iterdir()) == [] and blocker.read_text() == "x"


def test_a_refusal_after_the_run_folder_filled_and_a_bad_events_path_leave_nothing(phantom_3d, tmp_path):
    """A training refused after it wrote split.json and plan.json (a spacing that leaves one voxel)
    removes the runs/train-<time>/ it made; an --events path that is a folder exits 2 before any
    run folder exists (it used to be an IsADirectoryError traceback)."""
    work = tmp_path / "work"
    work.mkdir()
    res = run_cli("train", "--dataset", str(phantom_3d), "--spacing", "1000", "1000", "1000", "--quiet", cwd=work)
    assert res.returncode == 2 and "too few to learn from" in res.stderr, res.stderr
    assert list(work.iterdir()) == []
    res = run_cli("train", "--dataset", str(phantom_3d), "--events", str(tmp_path), "--quiet", cwd=work)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"--events {tmp_path}: cannot write it" in res.stderr
    assert list(work.iterdir()) == []
