"""Multi-process training under torchrun on CPU (gloo, 2 processes): `qgseg train`, `qgseg ssl
train` (mt, cps) and `qgseg quality train` launched exactly as a user would.

How equivalence with one process is checked. Each rank samples its own batches (seed
`rank_seed(seed, rank)`) and DDP averages the gradients, so step k of a 2-rank run with per-rank
batch B is step k of ONE process whose batch is the union of the two ranks' batches. The
reference below is that process: an ordinary in-process `Trainer` whose samplers concatenate the
two per-rank samplers' batches. With per-sample losses, instance norm and SGD, both runs compute
the same updates up to floating-point summation order, so their weights after all steps agree to
~1e-6 while they moved by ~1e-2 (a run without gradient averaging would be off by that much).
SGD, not AdamW: Adam's first steps are ~lr * sign(grad), which turns rounding noise on near-zero
gradients into full-size, sign-random updates. MT runs with teacher noise 0 (the only randomness
that comes from the per-rank torch RNG), and the consistency ramps are off so the unlabeled terms
count fully.

The quality predictor's batches are split per rank from the single-process order
(`RankBatchSampler`, checked exactly below), but g uses batch norm, whose statistics are per rank
on CPU (SyncBatchNorm needs GPUs); its loss is therefore compared with a loose tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from QGSegmentationLib.data.planning import read_plan
from QGSegmentationLib.data.samplers import PatchSampler
from QGSegmentationLib.engine.checkpoint import load_checkpoint
from QGSegmentationLib.engine.config import TrainConfig
from QGSegmentationLib.engine.distributed import (DistributedContext, LaunchEnv, launch_env,
                                                  rank_seed)
from QGSegmentationLib.engine.events import read_events, validate_stream
from QGSegmentationLib.engine.trainer import Trainer
from QGSegmentationLib.errors import ConfigError

from conftest import REPO

WORLD = 2
ITERATIONS = 6
SEED = 5
NETWORK = {"channels": [4, 8, 16]}
SSL_OPTIONS = {"teacher_noise_std": 0.0, "consistency_rampup_epochs": 0.0}
QUALITY = {"samples_per_case": 4, "val_samples_per_case": 2, "grid_size": [16, 16, 16], "p_weak": 0.5,
           "weak": {"epochs": 2, "snapshot_epochs": [1, 2], "patch_size": [16, 24, 24]}}
SEGMENTER_FILES = {"checkpoints/best.pt", "checkpoints/last.pt", "events.jsonl", "history.json",
                   "manifest.json", "plan.json", "split.json", "training_curves.png"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(*args: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "QGSegmentationLib.cli.main", *args]


def torchrun_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*args), capture_output=True, text=True, timeout=timeout,
                          env=torchrun_env(), cwd=REPO)


def segmenter_args(method: str, dataset, run_dir) -> list:
    command = ["train"] if method == "sup" else ["ssl", "train", "--method", method]
    args = [*command, "--dataset", str(dataset), "--patch", "16", "32", "32", "--batch", "1",
            "--unlabeled-batch", "1", "--iterations", str(ITERATIONS), "--val-every", "3",
            "--seed", str(SEED), "--optimizer", "sgd", "--lr", "0.01", "--device", "cpu", "--quiet",
            "--run-dir", str(run_dir), "--events", str(run_dir / "events.jsonl"),
            "--set", "network_options={channels: [4, 8, 16]}", "--set", "checkpoint_every=2"]
    if method != "sup":
        args += [f"--set=ssl.{k}={v}" for k, v in SSL_OPTIONS.items()]
    return args


def segmenter_config(method: str, dataset) -> TrainConfig:
    """The TrainConfig `segmenter_args` produce (checked against the run's checkpoint)."""
    return TrainConfig(dataset=str(dataset), patch_size=(16, 32, 32), batch_size=1, unlabeled_batch_size=1,
                       iterations=ITERATIONS, val_every=3, seed=SEED, optimizer="sgd", lr=0.01,
                       device="cpu", network_options=NETWORK, checkpoint_every=2, method=method,
                       ssl=dict(SSL_OPTIONS) if method != "sup" else {})


class UnionOfRanks:
    """Each step, the batches the ranks of a WORLD-process run draw, concatenated."""

    def __init__(self, samplers):
        self.samplers = samplers

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(s) for s in self.samplers]
        batch = {k: torch.cat([p[k] for p in parts]) for k in ("image", "label") if k in parts[0]}
        batch["case"] = [c for p in parts for c in p["case"]]
        return batch

    def state_dict(self):
        return {"ranks": [s.state_dict() for s in self.samplers]}


class GlobalBatchTrainer(Trainer):
    """One process whose batch is the union of the per-rank batches of a WORLD-rank run."""

    def make_samplers(self):
        cfg = self.cfg
        self.labeled_sampler = UnionOfRanks([
            PatchSampler(self.labeled, cfg.patch_size, cfg.batch_size, mode=cfg.mode, fg_ratio=cfg.fg_ratio,
                         augment=cfg.augment, seed=rank_seed(cfg.seed, r)) for r in range(WORLD)])
        self.unlabeled_sampler = None
        if self.unlabeled:
            self.unlabeled_sampler = UnionOfRanks([
                PatchSampler(self.unlabeled, cfg.patch_size, cfg.unlabeled_batch_size, mode=cfg.mode,
                             fg_ratio=0.0, augment=cfg.augment, seed=rank_seed(cfg.seed, r) + 1,
                             with_labels=False) for r in range(WORLD)])

    def build(self):
        super().build()
        self.initial = [{k: v.clone() for k, v in n.state_dict().items()} for n in self.networks]


def process_tree(pid: int) -> list:
    """`pid` and its descendants (Linux /proc). torchrun starts each worker in its own session,
    so killing the launcher's process group would leave the workers running."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and every worker at once, like a crashed machine; wait until gone."""
    tree = process_tree(pid)
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while any(alive(m) for m in tree[1:]) and time.time() < deadline:
        time.sleep(0.05)


def networks_of(path):
    return load_checkpoint(path)["networks"]


@pytest.fixture(scope="module")
def runs(phantom_3d, tmp_path_factory):
    """2-process runs of sup, mt and cps (shared by the tests below)."""
    root = tmp_path_factory.mktemp("ddp")
    out = {}
    for method in ("sup", "mt", "cps"):
        run_dir = root / method
        result = torchrun(*segmenter_args(method, phantom_3d, run_dir))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out[method] = (run_dir, result)
    return out


@pytest.mark.parametrize("method", ["sup", "mt", "cps"])
def test_two_process_run_equals_one_process_with_the_global_batch(runs, method, phantom_3d, tmp_path):
    run_dir, _ = runs[method]
    ddp_state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    cfg = segmenter_config(method, phantom_3d)
    planned = segmenter_config(method, phantom_3d)
    planned.apply_plan(read_plan(run_dir))  # the spacing the ranks planned, as plan.json keeps it
    assert ddp_state["config"] == planned.to_dict() and planned.target_spacing != "auto"
    assert ddp_state["world_size"] == WORLD and len(ddp_state["rank_states"]) == WORLD
    streams = [s["samplers"]["labeled"]["rng"] for s in ddp_state["rank_states"]]
    assert streams[0] != streams[1]  # the ranks drew different patches

    reference = GlobalBatchTrainer(cfg, tmp_path / "reference", progress_bar=False)
    result = reference.fit()
    ref_nets = networks_of(result.last_checkpoint)
    for index, (ddp_net, ref_net, init) in enumerate(zip(ddp_state["networks"], ref_nets, reference.initial)):
        moved = max(float((ref_net[k] - init[k]).abs().max()) for k in init)
        assert moved > 1e-3, f"network {index} barely trained ({moved}); the comparison would be void"
        for key in ref_net:
            assert torch.allclose(ddp_net[key], ref_net[key], rtol=1e-4, atol=1e-5), \
                (method, index, key, float((ddp_net[key] - ref_net[key]).abs().max()))
    if method == "mt":  # the EMA teacher followed identical students
        ddp_teacher = ddp_state["method_state"]["teacher"]["weights"]
        ref_teacher = load_checkpoint(result.last_checkpoint)["method_state"]["teacher"]["weights"]
        for key in ref_teacher:
            assert torch.allclose(ddp_teacher[key], ref_teacher[key], rtol=1e-4, atol=1e-5), key

    ddp_history = json.loads((run_dir / "history.json").read_text())
    assert [h["iteration"] for h in ddp_history] == [h["iteration"] for h in result.history] == [3, 6]
    for ours, theirs in zip(ddp_history, result.history):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)  # mean over ranks
        assert ours["val_dice"] == pytest.approx(theirs["val_dice"], abs=5e-3)


@pytest.mark.parametrize("method", ["sup", "mt"])
def test_only_rank_zero_writes_one_set_of_files(runs, method):
    run_dir, result = runs[method]
    written = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}
    assert written == SEGMENTER_FILES
    events = read_events(run_dir / "events.jsonl")
    validate_stream(events)
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("done") == 1
    assert len({e["pid"] for e in events if e["event"] == "start"}) == 1
    assert events[-1]["status"] == "ok"
    assert [e["step"] for e in events if e["event"] == "metric"] == [3, 6]
    assert result.stdout.count("best validation Dice") == 1  # messages from rank 0 only


def test_killed_run_resumes_from_its_checkpoint(runs, phantom_3d, tmp_path):
    """SIGKILL torchrun and its workers once last.pt exists; the rerun resumes from it,
    every rank from its own sampler/RNG state, and ends where the uninterrupted run ended."""
    run_dir = tmp_path / "killed"
    args = segmenter_args("sup", phantom_3d, run_dir)
    proc = subprocess.Popen(torchrun_command(*args), env=torchrun_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.wait()
    killed_at = load_checkpoint(last)["iteration"]
    assert 0 < killed_at < ITERATIONS

    again = torchrun(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    warnings = [e["message"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "warning"]
    assert any(f"at iteration {killed_at}" in m for m in warnings), warnings
    uninterrupted = networks_of(runs["sup"][0] / "checkpoints" / "last.pt")[0]
    resumed = networks_of(last)[0]
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key


def test_cancel_file_stops_every_rank_at_the_same_iteration(phantom_3d, tmp_path):
    """Rank 0 looks for CANCEL and tells the others: all save together and exit 3 (no hang)."""
    run_dir = tmp_path / "cancelled"
    args = segmenter_args("sup", phantom_3d, run_dir)
    proc = subprocess.Popen(torchrun_command(*args), env=torchrun_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    (run_dir / "CANCEL").write_text("stop")
    output, _ = proc.communicate(timeout=240)
    done = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "done"]
    assert len(done) == 1 and done[0]["status"] == "cancelled" and done[0]["exit_code"] == 3, output[-3000:]
    assert proc.returncode != 0  # torchrun reports a failed worker group
    assert output.count("qgseg: cancelled:") == 2  # both ranks stopped for the same reason
    assert 0 < load_checkpoint(last)["iteration"] < ITERATIONS


def test_quality_training_two_processes(phantom_3d, tmp_path):
    """2 ranks x batch 2 against one process with batch 4 on the same samples per step; batch
    norm statistics are per rank on CPU, so the losses agree only roughly."""
    from QGSegmentationLib.data.dataset import load_dataset
    from QGSegmentationLib.quality.train import train_quality_predictor

    run_dir = tmp_path / "g"
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**QUALITY, "batch_size": 2}.items()]
    result = torchrun("quality", "train", "--dataset", str(phantom_3d), "--epochs", "2", "--device", "cpu",
                      "--quiet", "--run-dir", str(run_dir), "--events", str(run_dir / "events.jsonl"), *sets)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}
    assert written == {"checkpoints/best.pt", "checkpoints/last.pt", "events.jsonl", "quality_history.json",
                       "quality_result.json", "quality_training_curve.png",
                       "quality_calibration_validation.png", "weak/weak_predictions.json",
                       "weak/weak_predictions.npz", "manifest.json", "split.json"}
    events = read_events(run_dir / "events.jsonl")
    validate_stream(events)
    assert [e["event"] for e in events].count("start") == 1
    ddp = json.loads((run_dir / "quality_history.json").read_text())["history"]

    single = train_quality_predictor(load_dataset(phantom_3d), {**QUALITY, "batch_size": 4, "epochs": 2},
                                     tmp_path / "single", progress=False, device="cpu")["history"]
    assert [h["epoch"] for h in ddp] == [h["epoch"] for h in single] == [1, 2]
    # 12 samples per epoch, global batch 4: the same 3 optimizer steps per epoch, same lr schedule
    assert [h["lr"] for h in ddp] == pytest.approx([h["lr"] for h in single], rel=1e-6)
    for ours, theirs in zip(ddp, single):  # observed: within 0.5% (epoch 1) and 6% (epoch 2)
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=0.2)
        assert ours["val_mae"] == pytest.approx(theirs["val_mae"], abs=0.02)


def test_rank_batches_partition_the_single_process_batches():
    """Union over ranks of step j's quality samples == single-process batch j (batch x world)."""
    from QGSegmentationLib.quality.train import _loader

    def item(i):
        return {"image": torch.zeros(1), "mask": torch.zeros(1), "target": torch.zeros(1),
                "category": "", "view": "", "case": str(i)}

    dataset = [item(i) for i in range(23)]
    for batch, world, drop_last in ((2, 2, True), (3, 4, True), (4, 2, True), (16, 2, False)):
        single = [sorted(b["case"]) for b in _loader(dataset, batch * world, True, 0, 7, drop_last)]
        per_rank = [[b["case"] for b in _loader(dataset, batch, True, 0, 7, drop_last, rank, world)]
                    for rank in range(world)]
        assert len({len(p) for p in per_rank}) == 1, "every rank must take the same number of steps"
        assert len(per_rank[0]) == len(single)
        for step, wanted in enumerate(single):
            parts = [p[step] for p in per_rank]
            union = sorted(c for part in parts for c in part)
            assert len(union) == len(set(union)), "ranks overlap"
            if drop_last:
                assert union == wanted and all(len(p) == batch for p in parts)
            else:  # fewer samples than one global batch: split evenly, remainder unused
                assert set(union) <= set(wanted) and all(len(p) == len(dataset) // world for p in parts)


def test_launch_environment_is_read_and_checked():
    assert launch_env({}) == LaunchEnv(0, 0, 1)
    env = launch_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (env.rank, env.local_rank, env.world_size, env.distributed, env.is_main) == (3, 1, 4, True, False)
    assert launch_env({"WORLD_SIZE": "1", "RANK": "0"}).distributed is False
    with pytest.raises(ConfigError, match="RANK=4"):
        launch_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        launch_env({"WORLD_SIZE": "two"})
    assert [rank_seed(SEED, r) for r in range(3)] == [SEED, SEED + 1000, SEED + 2000]


def test_sync_batchnorm_is_refused_on_cpu_and_a_no_op_in_one_process():
    nets = [torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))]
    single = DistributedContext(LaunchEnv(0, 0, 1), torch.device("cpu"))
    assert single.convert_sync_batchnorm(nets, True)[0] is nets[0]
    assert isinstance(nets[0][1], torch.nn.BatchNorm3d)
    two_cpu_ranks = DistributedContext(LaunchEnv(0, 0, 2), torch.device("cpu"))
    with pytest.raises(ConfigError, match="sync_batchnorm=true needs CUDA"):
        two_cpu_ranks.convert_sync_batchnorm(nets, True)
    assert TrainConfig.from_dict({"sync_batchnorm": True}).sync_batchnorm is True


def test_torchrun_without_run_dir_exits_2(monkeypatch, capsys, tmp_path):
    from QGSegmentationLib.cli.common import run_with_events

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.chdir(tmp_path)
    args = Namespace(run_dir=None, events=None, json=False, quiet=True)
    assert run_with_events(args, "train", lambda ctx: {}) == 2
    assert "pass --run-dir" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_worker_exits_with_its_code_and_flushed_output_but_skips_finalization():
    """`exit_worker` ends a torchrun worker without interpreter finalization, where a gloo thread
    releasing a collective's tensors aborted the process (SIGABRT): the exit code and the buffered
    output survive, atexit handlers (finalization) do not run."""
    program = ("import atexit, sys\n"
               "from QGSegmentationLib.engine.distributed import exit_worker\n"
               "atexit.register(lambda: print('finalized'))\n"
               "print('written before the exit', end='')\n"
               "sys.stderr.write('and on stderr')\n"
               "exit_worker(3)\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                            env=torchrun_env(), cwd=REPO)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "written before the exit" and result.stderr == "and on stderr"
