"""Job folders, job specs, worker argument lists and dependency checks (pure Python)."""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

from QGSegmentationLib.slicer import environment as env
from QGSegmentationLib.slicer import jobs
from QGSegmentationLib.slicer.jobs import (CaseEntry, JobSpec, TrainingOptions, create_job_folder,
                                          find_checkpoint, make_case_ids, plan_hint, predict_arguments,
                                          quality_arguments, read_job_spec, second_opinion_train_arguments,
                                          train_arguments,
                                          write_dataset_json, write_job_spec)


def test_case_ids_are_file_safe_and_unique():
    assert make_case_ids(["CT chest", "CT chest", "ct CHEST", "", "a/b:c"]) == [
        "CT_chest", "CT_chest_2", "ct_CHEST_3", "case", "a_b_c"]


def test_job_folder_never_reused(tmp_path):
    a = create_job_folder(tmp_path, run_id="run-1")
    b = create_job_folder(tmp_path, run_id="run-1")
    assert a.root.name == "run-1" and b.root.name == "run-1-2"
    assert a.images_dir.is_dir() and a.run_dir.is_dir() and a.predictions_dir.is_dir()
    assert a.prediction_path("x") == a.root / "predictions" / "x.seg.nrrd"
    with pytest.raises(ValueError, match="output folder is empty"):
        create_job_folder("")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        create_job_folder(tmp_path / "file")


def test_job_spec_round_trip_and_dataset_json(tmp_path):
    folder = create_job_folder(tmp_path, run_id="r")
    cases = [CaseEntry("A", "vtkMRMLScalarVolumeNode1", "A", "labeled", "vtkMRMLSegmentationNode1"),
             CaseEntry("B", "vtkMRMLScalarVolumeNode2", "B", "unlabeled")]
    spec = JobSpec(kind="train", run_id="r", cases=cases, options={"iterations": 5},
                   label_names=["organ"], versions={"QGSegmentationLib": "0.1.0"})
    write_job_spec(folder, spec)
    back = read_job_spec(folder.job_json)
    assert back == spec and back.case("B").role == "unlabeled"
    with pytest.raises(KeyError):
        back.case("Z")
    desc = json.loads(write_dataset_json(folder, cases, ["organ"]).read_text())
    assert desc["training"] == [{"image": "images/A.nrrd", "label": "labels/A.nrrd"}]
    assert desc["unlabeled"] == ["images/B.nrrd"] and desc["labels"]["1"] == "organ"
    with pytest.raises(ValueError, match="role"):
        CaseEntry("C", "id", "C", "teacher")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: job spec is not valid JSON"):
        read_job_spec(tmp_path / "bad.json")
    # edited by hand: each mistake is a ValueError naming the file (job run: exit 2), not a TypeError
    good = json.loads(folder.job_json.read_text())
    for broken, why in (([good], "must be a JSON object"), ({**good, "cases": 5}, "must be a list of objects"),
                        ({**good, "cases": [{"case": "A"}]}, "not a valid job spec"),
                        ({**good, "extra": 1}, "not a valid job spec"),
                        ({**good, "cases": [{**good["cases"][0], "role": "teacher"}]}, "role must be one of")):
        (tmp_path / "edited.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=why) as refused:
            read_job_spec(tmp_path / "edited.json")
        assert "edited.json" in str(refused.value)


def test_a_job_naming_an_unknown_network_or_method_is_refused_before_it_runs():
    """A job.json edited to name a network or method the panel does not offer used to fail only
    after the whole quality stage had run."""
    with pytest.raises(ValueError, match="architecture must be one of .*'bogus'"):
        TrainingOptions(architecture="bogus").validate()
    with pytest.raises(ValueError, match="SSL method must be one of .*'bogus'"):
        TrainingOptions(ssl_method="bogus").validate()
    assert TrainingOptions(architecture="segresnet", ssl_method="cps").validate()

def test_stage_arguments(tmp_path):
    folder = create_job_folder(tmp_path, run_id="r")
    opts = TrainingOptions(iterations=7, batch_size=1, patch_size=32, seed=5, device="cpu",
                           guidance_qw=False, target_spacing=1.5, quality_epochs=3)
    q = quality_arguments(folder, opts)
    assert q[:2] == ["quality", "train"] and q[q.index("--run-dir") + 1] == str(folder.quality_dir)
    assert q[q.index("--epochs") + 1] == "3" and "--seeds" not in q
    four = quality_arguments(folder, TrainingOptions(quality_seeds=4))
    assert four[four.index("--seeds") + 1] == "4"
    with pytest.raises(ValueError, match="quality predictor seeds must be >= 1"):
        quality_arguments(folder, TrainingOptions(quality_seeds=0))
    three = TrainingOptions(segmenter_seeds=3, seed=5, guidance_qar=False, guidance_qw=False)
    segmenter, second = train_arguments(folder, three), second_opinion_train_arguments(folder, three)
    assert segmenter[segmenter.index("--seeds") + 1] == "3" and segmenter[segmenter.index("--seed") + 1] == "5"
    assert "--seeds" not in second and second[second.index("--seed") + 1] == "8"  # no member's seed
    assert "--seeds" not in train_arguments(folder, TrainingOptions(guidance_qar=False, guidance_qw=False))
    with pytest.raises(ValueError, match="segmenter seeds must be >= 1"):
        train_arguments(folder, TrainingOptions(segmenter_seeds=0))
    args = train_arguments(folder, opts, quality_checkpoint="/q/best.pt")
    assert args[:7] == ["train", "--dataset", str(folder.dataset_json), "--run-dir",
                        str(folder.run_dir), "--events", str(folder.train_events)]
    at = args.index
    assert args[at("--iterations") + 1] == "7" and args[at("--device") + 1] == "cpu"
    assert args[at("--patch") + 1: at("--patch") + 4] == ["32", "32", "32"]
    assert args[at("--guidance") + 1] == "qar" and args[at("--quality-checkpoint") + 1] == "/q/best.pt"
    assert args[at("--spacing") + 1: at("--spacing") + 4] == ["1.5", "1.5", "1.5"]
    two_d = train_arguments(folder, TrainingOptions(mode="2d", patch_size=64, guidance_qar=False,
                                                    guidance_qw=False))
    assert two_d[two_d.index("--patch") + 1: two_d.index("--patch") + 3] == ["64", "64"]
    assert two_d[two_d.index("--spacing") + 1] == "auto" and "--quality-checkpoint" not in two_d
    planned = train_arguments(folder, TrainingOptions(), quality_checkpoint="/q/best.pt")  # defaults: both planned
    # 2000 iterations of 50 are 40 epochs: the QG-SSL paper's 200-epoch QAR / QW schedules scaled to them
    assert [a for a in planned if a.startswith("--set=ssl.")] == [
        "--set=ssl.qar_delay_epochs=6", "--set=ssl.qar_rampup_epochs=8",
        "--set=ssl.qw_delay_epochs=3", "--set=ssl.qw_rampup_epochs=6"]
    assert not any(a.startswith("--set=ssl.") for a in two_d)  # no guidance, no schedule
    assert planned[planned.index("--patch") + 1: planned.index("--patch") + 3] == ["auto", "--seed"]
    after_spacing = planned[planned.index("--spacing") + 1:]
    assert after_spacing[0] == "auto" and (len(after_spacing) == 1 or after_spacing[1].startswith("--"))
    with pytest.raises(ValueError, match="patch size must be 0 \\(auto\\) or >= 8"):
        train_arguments(folder, TrainingOptions(patch_size=4))
    with pytest.raises(ValueError, match="needs a quality predictor checkpoint"):
        train_arguments(folder, TrainingOptions())
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        train_arguments(folder, TrainingOptions(iterations=0), "/q.pt")
    with pytest.raises(ValueError, match="device"):
        TrainingOptions(device="tpu").validate()
    pred = predict_arguments(folder, "/m/best.pt", "cuda", quality_checkpoint="/q/best.pt")
    assert pred[:3] == ["predict", "--checkpoint", "/m/best.pt"]
    assert pred[pred.index("--split") + 1] == "unlabeled"
    assert pred[pred.index("--output") + 1] == str(folder.predictions_dir)
    assert pred[pred.index("--run-dir") + 1] == str(folder.predict_run_dir)
    only = predict_arguments(folder, "/m/best.pt", from_dataset=False)
    assert only[only.index("--input") + 1] == str(folder.images_dir) and "--split" not in only
    assert "--no-mirror" not in pred and predict_arguments(folder, "/m/best.pt", mirror=False)[-1] == "--no-mirror"
    second = predict_arguments(folder, "/m/best.pt", second_opinion="/other/segmenter.pt")
    assert second[second.index("--second-opinion") + 1] == "/other/segmenter.pt" and "--second-opinion" not in pred
    with pytest.raises(ValueError):
        predict_arguments(folder, "/m/best.pt", "gpu")


def test_stage_arguments_parse_with_the_real_command_line(tmp_path):
    """The argument lists are accepted by the worker's own parser (flags and choices exist)."""
    main = pytest.importorskip("QGSegmentationLib.cli.main")
    parser = main.build_parser()
    folder = create_job_folder(tmp_path, run_id="r")
    opts = TrainingOptions(mode="2d", target_spacing=0.8, quality_epochs=2, quality_seeds=3)
    for args in (quality_arguments(folder, opts), train_arguments(folder, opts, "/q/best.pt"),
                 predict_arguments(folder, "/m/best.pt", "cpu", "/q/best.pt"),
                 predict_arguments(folder, "/m/best.pt", from_dataset=False, mirror=False),
                 predict_arguments(folder, "/m/best.pt", "cpu", "/q/best.pt", second_opinion="/o/segmenter.pt")):
        parsed = parser.parse_args(args)
        assert callable(parsed.func), args


def test_model_segmenter_of_a_saved_model_folder(tmp_path):
    from QGSegmentationLib.slicer.jobs import MODEL_SEGMENTER_FILE, model_segmenter

    with pytest.raises(ValueError, match="second-opinion model folder .*does not exist"):
        model_segmenter(tmp_path / "missing", "second-opinion model folder")
    with pytest.raises(ValueError, match=f"holds no {MODEL_SEGMENTER_FILE}"):
        model_segmenter(tmp_path)
    (tmp_path / MODEL_SEGMENTER_FILE).write_bytes(b"weights")
    assert model_segmenter(tmp_path) == tmp_path / MODEL_SEGMENTER_FILE


def test_model_folder_round_trip_with_second_opinion(tmp_path):
    """Save model copies the checkpoints under fixed names; saving a model without a second
    opinion over one that had it removes the old second opinion (never two models mixed)."""
    from QGSegmentationLib.slicer.jobs import (MODEL_SECOND_OPINION_FILE, read_model_folder,
                                              save_model_folder)

    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "g.pt", "other.pt", "job.json"):
        (run / name).write_bytes(name.encode())
    model = save_model_folder(tmp_path / "model", run / "best.pt", run / "g.pt", run / "other.pt",
                              job_json=run / "job.json")
    assert model == read_model_folder(tmp_path / "model")
    assert model.second_opinion.read_bytes() == b"other.pt" and model.quality.read_bytes() == b"g.pt"
    assert model.job_json.read_bytes() == b"job.json" and model.segmenter.read_bytes() == b"best.pt"
    again = save_model_folder(tmp_path / "model", run / "best.pt")
    assert again.second_opinion is None and again.quality is None and again.job_json is None
    assert not (tmp_path / "model" / MODEL_SECOND_OPINION_FILE).exists()
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["segmenter.pt"]
    with pytest.raises(ValueError, match="missing.pt does not exist"):
        save_model_folder(tmp_path / "model2", run / "best.pt", run / "missing.pt")
    assert not (tmp_path / "model2").exists()
    with pytest.raises(ValueError, match="choose a model folder"):
        save_model_folder("", run / "best.pt")
    with pytest.raises(ValueError, match="is not a folder"):
        save_model_folder(run / "job.json", run / "best.pt")
    with pytest.raises(ValueError, match="holds no segmenter.pt"):
        read_model_folder(run)


def test_a_loaded_model_saved_again_keeps_its_job_spec_and_manifest(tmp_path):
    """Save model after Load model: the records go with the model (they were those of whatever
    run the panel had last, or nothing, and the save removed the folder's job.json and manifest)."""
    from QGSegmentationLib.slicer.jobs import read_model_folder, run_model_records, save_model_folder

    run = create_job_folder(tmp_path / "runs")
    write_job_spec(run, JobSpec(kind="train", run_id=run.run_id, label_names=["liver"]))
    (run.run_dir / "checkpoints").mkdir()
    (run.run_dir / "checkpoints" / "best.pt").write_bytes(b"w")
    (run.quality_dir / "best.pt").write_bytes(b"g")
    (run.run_dir / "manifest.json").write_text('{"device": "cpu"}')
    records = run_model_records(run)  # what a finished (or imported) Train run hands to Save model
    assert (records.job_json, records.manifest) == (run.job_json, run.run_dir / "manifest.json")
    saved = save_model_folder(tmp_path / "model X", run.run_dir / "checkpoints" / "best.pt",
                              run.quality_dir / "best.pt", None, *records)
    assert saved.manifest.read_text() == '{"device": "cpu"}' and saved.spec().label_names == ["liver"]

    loaded = read_model_folder(tmp_path / "model X")  # Load model
    for target in (tmp_path / "model X", tmp_path / "copy"):  # saved again in place, and elsewhere
        again = save_model_folder(target, loaded.segmenter, loaded.quality, loaded.second_opinion,
                                  *loaded.records.existing())
        files = sorted(p.name for p in target.iterdir())
        assert files == ["job.json", "manifest.json", "quality.pt", "segmenter.pt"]
        assert again.manifest.read_text() == '{"device": "cpu"}' and again.spec().label_names == ["liver"]

    bare = save_model_folder(tmp_path / "bare", loaded.segmenter)  # a model without records
    assert read_model_folder(bare.segmenter.parent).spec() is None and bare.records == jobs.ModelRecords()
    segment_run = create_job_folder(tmp_path / "runs", prefix="segment")  # a Segment job trains nothing
    assert run_model_records(segment_run) == jobs.ModelRecords()


def test_listed_networks_and_methods_are_registered():
    networks = pytest.importorskip("QGSegmentationLib.networks")
    methods = pytest.importorskip("QGSegmentationLib.ssl.methods")
    assert set(jobs.ARCHITECTURES) <= set(networks.NETWORKS.names())
    assert set(jobs.SSL_METHODS) <= set(methods.METHODS.names())


def test_find_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(ValueError, match="left no checkpoint"):
        find_checkpoint(run_dir)
    (run_dir / "checkpoints").mkdir()
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(b"x")
    best = run_dir / "checkpoints" / "best.pt"
    best.write_bytes(b"x")
    assert find_checkpoint(run_dir) == best
    assert find_checkpoint(run_dir, {"best_checkpoint": "checkpoints/last.pt"}) == last
    assert find_checkpoint(run_dir, {"checkpoint": str(tmp_path / "missing.pt")}) == best


def test_versions_and_requirements():
    assert env.parse_version("2.5.1+cu121") == (2, 5, 1)
    assert env.version_at_least("2.10", "2.2") and not env.version_at_least("1.13.1", "2.2")
    assert env.version_at_least("2", "2.0.0") and not env.version_at_least("garbage", "1")
    fake = {"monai": "1.3.0", "pyyaml": "6.0.1", "numpy": "1.20"}

    def lookup(name):
        if name in fake:
            return fake[name]
        raise metadata.PackageNotFoundError(name)

    statuses = env.check_requirements(lookup=lookup)
    by_name = {s.name: s for s in statuses}
    assert not by_name["monai"].ok and by_name["pyyaml"].ok and by_name["tqdm"].installed is None
    to_install = env.pip_requirements_to_install(statuses)
    assert "monai>=1.5" in to_install and "tqdm>=4.60" in to_install
    # Slicer's own packages are never pip-installed from the panel.
    assert not any(r.split(">=")[0].lower() in env.SLICER_PROVIDED for r in to_install)
    assert any("numpy" in p for p in env.slicer_provided_problems(statuses))
    assert env.torch_status(lookup=lookup).installed is None


def test_a_too_old_torch_is_upgraded_and_judged_without_importing_it():
    """The panel asked PyTorchUtils' torchInstalled(), which imports torch into Slicer and is
    true for a torch older than the worker needs, so a too-old torch was never upgraded."""
    installed = {"monai": "1.5.0", "pyyaml": "6.0.1", "tqdm": "4.66", "matplotlib": "3.8", "numpy": "1.26",
                 "scipy": "1.11", "SimpleITK": "2.3.1", "einops": "0.7"}

    def lookup_with(torch=None):
        def lookup(name):
            if name == "torch" and torch:
                return torch
            if name in installed:
                return installed[name]
            raise metadata.PackageNotFoundError(name)
        return lookup

    statuses = env.check_requirements(lookup=lookup_with())
    old = env.install_plan(statuses, env.torch_status(lookup=lookup_with("2.2.2+cpu")))
    assert old.torch and old.pip == () and old.broken == () and not old.nothing_to_install
    assert old.listing() == [f"PyTorch {env.TORCH_REQUIREMENT}"]
    assert env.install_plan(statuses, env.torch_status(lookup=lookup_with(None))).torch  # missing
    new = env.install_plan(statuses, env.torch_status(lookup=lookup_with("2.5.1+cu121")))
    assert new.nothing_to_install and new.listing() == []
    forced = env.install_plan(statuses, env.torch_status(lookup=lookup_with("2.5.1")), force=True)
    assert not forced.torch and "monai>=1.5" in forced.pip  # Reinstall: the pip packages again
    assert not any(r.split(">=")[0].lower() in env.SLICER_PROVIDED for r in forced.pip)
    installed["numpy"] = "1.20"
    assert env.install_plan(env.check_requirements(lookup=lookup_with()),
                            env.torch_status(lookup=lookup_with("2.5.1"))).broken


def declared_floors() -> dict:
    """{distribution (lower case): minimum version} of pyproject.toml's `dependencies`."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return {name.lower(): version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', block)}


def test_the_panel_checks_exactly_the_floors_pyproject_declares():
    declared = declared_floors()
    assert "torch" in declared and "monai" in declared  # the pattern above still reads the file
    assert env.TORCH_REQUIREMENT == ">=" + declared.pop("torch")
    assert {name.lower(): minimum for name, minimum in env.REQUIREMENTS} == declared


def test_probe_torch_in_a_child_process_and_diagnostics():
    info = env.probe_torch(sys.executable, timeout_s=300)
    assert info.error is None, info.error
    assert info.torch.split("+")[0] == metadata.version("torch").split("+")[0]
    text = env.diagnostics_text(env.check_requirements(), info, {"slicer": "test"})
    assert "slicer: test" in text and "torch probe" in text and info.summary in text
    broken = env.probe_torch(sys.executable + "-missing")
    assert broken.error and "probe failed" in broken.error


def test_plan_hint_says_what_auto_becomes_on_the_device_that_trains():
    from QGSegmentationLib.data.planning import Fingerprint, make_plan

    la_like = Fingerprint(sizes=((190, 142, 88),) * 3, spacings=((0.625, 0.625, 0.625),) * 3)
    cpu, gpu = make_plan(la_like, "3d", "cpu"), make_plan(la_like, "3d", "cuda")
    unknown = plan_hint(TrainingOptions(), la_like, gpu_available=None)  # before the device probe
    assert unknown == ("auto on the CPU: spacing 1.25 x 1.25 x 1.25 mm, patch 48x48x48; on the GPU: spacing "
                       f"0.625 x 0.625 x 0.625 mm, patch {'x'.join(map(str, gpu.patch_size))} "
                       "(planned from 3 labeled volumes)")
    assert plan_hint(TrainingOptions(), la_like, gpu_available=True).startswith("auto on the GPU: spacing 0.625")
    assert plan_hint(TrainingOptions(device="cpu"), la_like, gpu_available=True).startswith("auto on the CPU")
    fixed_spacing = plan_hint(TrainingOptions(target_spacing=2.5, device="cpu"), la_like, gpu_available=False)
    patch_at_2_5 = make_plan(la_like, "3d", "cpu", spacing=(2.5, 2.5, 2.5)).patch_size
    assert fixed_spacing == f"auto on the CPU: patch {'x'.join(map(str, patch_at_2_5))} (planned from 3 labeled volumes)"
    assert patch_at_2_5 != cpu.patch_size  # planned for the spacing the user chose
    assert plan_hint(TrainingOptions(target_spacing=1.0, patch_size=64), la_like, gpu_available=None) == ""
    assert "when you mark some as labeled" in plan_hint(TrainingOptions(), None, gpu_available=None)
    two_d = plan_hint(TrainingOptions(mode="2d", device="cpu"), la_like, gpu_available=None)
    assert "patch 144x192" in two_d
