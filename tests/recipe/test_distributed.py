"""Multi-process training (gloo on the CPU): sharding, temperature sync, equality with one process, resume.

The 2-rank runs are real separate processes started like torchrun starts them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT) with a timeout, so a hang fails the test.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastabsld import attack
from fastabsld.recipe import distributed
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.data import TensorLoader, load_digits
from fastabsld.recipe.models import MODELS
from fastabsld.recipe.train import train
from tests.recipe import dist_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 120
# Global batch 64 over 128 images: 2 steps per epoch; eval only after the last epoch, so the returned
# ("best") weights are the last ones.
TINY = dict(method="absld", epochs=2, batch_size=64, steps=2, train_subset=128, progress=False, eval_every=10,
            val_attacks=("clean",), select_metric="clean.average", test_attacks=("clean", "fgsm"))



def _epochs(loader, epochs):
    return [[(x.clone(), y.tolist()) for x, y in loader] for _ in range(epochs)]


@settings(max_examples=25, deadline=None)
@given(world=st.integers(1, 4), n=st.integers(4, 40), per_rank=st.integers(1, 5), drop_last=st.booleans(),
       augment=st.booleans())
def test_shards_partition_each_global_batch(world, n, per_rank, drop_last, augment):
    batch = world * per_rank
    x = torch.rand(n, 1, 4, 4)
    y = torch.arange(n)
    ref_loader = TensorLoader(x, y, batch, shuffle=True, seed=5, augment=augment, drop_last=drop_last)
    loaders = [distributed.ShardedTensorLoader(x, y, batch, rank=r, world_size=world, shuffle=True, seed=5,
                                               augment=augment, drop_last=drop_last) for r in range(world)]
    ref, shards = _epochs(ref_loader, 3), [_epochs(loader, 3) for loader in loaders]
    # The generators stay in step with the single process's (what a checkpoint saves and restores).
    assert all(torch.equal(loader.generator.get_state(), ref_loader.generator.get_state()) for loader in loaders)
    for epoch in range(3):
        assert all(len(s[epoch]) == len(loaders[0]) for s in shards)
        seen = []
        for b, (ref_x, ref_y) in enumerate(ref[epoch][:len(shards[0][epoch])]):
            keep = len(ref_y) - len(ref_y) % world
            for r in range(world):
                x_r, y_r = shards[r][epoch][b]
                # Rank r holds rows r::world of the single-process batch, augmentation included.
                assert y_r == ref_y[:keep][r::world]
                assert torch.equal(x_r, ref_x[:keep][r::world])
                seen += y_r
        # Each sample at most once per epoch; every one of the full global batches is covered.
        assert len(seen) == len(set(seen))
        full = (n // batch) * batch
        assert set(sum((yb for _, yb in ref[epoch][:n // batch]), [])) <= set(seen) and len(seen) >= full
        if not drop_last:
            assert len(seen) == n - (n % batch) % world
    # The same shards, epoch by epoch, for a fresh loader with the same seed.
    again = _epochs(distributed.ShardedTensorLoader(x, y, batch, rank=0, world_size=world, shuffle=True, seed=5,
                                                    augment=augment, drop_last=drop_last), 3)
    assert [[yb for _, yb in e] for e in again] == [[yb for _, yb in e] for e in shards[0]]


def test_sharded_loader_rejects_bad_settings():
    x, y = torch.rand(8, 1), torch.arange(8)
    with pytest.raises(ValueError, match="multiple of the world size"):
        distributed.ShardedTensorLoader(x, y, 6, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank must be"):
        distributed.ShardedTensorLoader(x, y, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least world_size"):
        distributed.ShardedTensorLoader(x[:1], y[:1], 2, rank=0, world_size=2)


@pytest.mark.parametrize("start,norm", [("normal", "linf"), ("uniform", "linf"), ("uniform", "l2")])
def test_sharded_draws_reproduce_the_full_batch_start(start, norm):
    x = torch.rand(6, 2, 3, 3)
    full = attack.pgd(lambda v: v.flatten(1), x, lambda z: z.sum(), eps=0.1, alpha=0.0, steps=0, norm=norm,
                      random_start=start, generator=torch.Generator().manual_seed(3))
    for rank in range(3):
        gen = torch.Generator().manual_seed(3)
        with attack.sharded_draws(rank, 3):
            part = attack.pgd(lambda v: v.flatten(1), x[rank::3], lambda z: z.sum(), eps=0.1, alpha=0.0, steps=0,
                              norm=norm, random_start=start, generator=gen)
        assert torch.equal(part, full[rank::3])
    with pytest.raises(ValueError, match="index"):
        with attack.sharded_draws(3, 3):
            pass


def test_alone_everything_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.session("cpu") as ctx:
        assert ctx == distributed.Context() and ctx.is_main and not ctx.distributed
        model = torch.nn.Linear(2, 2)
        assert ctx.wrap(model) is model
        value = torch.tensor(3.0)
        assert ctx.mean(value) is value and ctx.from_main(7) == 7
        assert type(ctx.train_loader(torch.zeros(4, 1), torch.arange(4), 2)) is TensorLoader
    assert not torch.distributed.is_initialized()


def test_sync_bn_needs_cuda():
    with pytest.raises(ValueError, match="sync_bn needs CUDA"):
        distributed.Context(rank=0, world_size=2).wrap(torch.nn.BatchNorm1d(3), sync_bn=True)


def test_only_train_runs_under_torchrun(monkeypatch, tmp_path, capsys):
    from fastabsld.study import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "only 'train' runs under torchrun" in capsys.readouterr().err and not (tmp_path / "demo").exists()



def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    """The digits splits saved for the worker processes."""
    path = tmp_path_factory.mktemp("digits") / "digits.pt"
    torch.save(load_digits(0), path)
    return str(path)


def _launch(world, spec, out, with_logs=False):
    """Runs ``tests.recipe.dist_worker`` as ``world`` processes; returns {rank: result} of the ranks that finished.

    With ``with_logs``: also the list of each rank's output.
    """
    os.makedirs(out, exist_ok=True)
    spec = dict(spec, out=str(out))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.recipe.dist_worker", json.dumps(spec)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"a {world}-process run hung for {TIMEOUT_S} s")
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{logs[rank][-3000:]}"
    files = {int(f[4:-3]): f for f in os.listdir(out) if f.startswith("rank")}
    results = {rank: torch.load(os.path.join(out, f), weights_only=False) for rank, f in files.items()}
    return (results, logs) if with_logs else results


def _taus(history):
    return torch.tensor([e["tau_adv"] + e["tau_nat"] for e in history], dtype=torch.float64)


@pytest.fixture(scope="module")
def two_rank_plain(tmp_path_factory, digits_file):
    """A 2-rank ABSLD run of the BatchNorm-free student (2 epochs, global batch 64)."""
    base = tmp_path_factory.mktemp("ddp_plain")
    spec = {"config": dict(TINY, model=dist_worker.PLAIN_MODEL), "run_dir": str(base / "run"), "data": digits_file}
    return base, spec, _launch(2, spec, base / "out")


def test_two_ranks_match_one_process(two_rank_plain, tmp_path, monkeypatch):
    _, spec, results = two_rank_plain
    assert sorted(results) == [0, 1]
    # The same temperatures and weights on both ranks (all-reduced risks, DDP-averaged gradients).
    r0, r1 = results[0], results[1]
    assert torch.equal(_taus(r0["history"]), _taus(r1["history"]))
    assert all(torch.equal(v, r1["model"][k]) for k, v in r0["model"].items())
    # One process, global batch 64: the same run up to float rounding.
    monkeypatch.setitem(MODELS, dist_worker.PLAIN_MODEL, dist_worker.plain_model)
    single = train(TrainConfig(**spec["config"]), None, teacher=dist_worker.teacher(), data=load_digits(0),
                   log=lambda *_: None)
    taus = _taus(single["history"])
    assert not torch.allclose(taus, torch.ones_like(taus))  # the temperatures moved: the check has teeth
    torch.testing.assert_close(_taus(r0["history"]), taus, rtol=1e-5, atol=1e-6)
    losses = [e["train_loss"] for e in single["history"]]
    torch.testing.assert_close([e["train_loss"] for e in r0["history"]], losses, rtol=1e-5, atol=1e-6)
    state = single["model"].state_dict()
    start = dist_worker.plain_model(10, 1).state_dict()
    for k, v in state.items():
        assert not torch.allclose(v, start[k])  # trained away from a fresh init
        torch.testing.assert_close(r0["model"][k], v, rtol=1e-4, atol=1e-5)


def test_rank_zero_alone_writes_the_run_folder(two_rank_plain):
    base, _, results = two_rank_plain
    assert results[1]["writes"] == []
    assert {"atomic_save", "write_metrics", "plot_run"} <= set(results[0]["writes"])
    names = set(os.listdir(base / "run"))
    assert {"metrics.json", "last.pt", "best.pt", "per_class.png", "temperatures.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    metrics = json.loads((base / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["history"]) == 2
    assert metrics["history"][-1]["tau_adv"] == results[0]["history"][-1]["tau_adv"]


def test_two_rank_resume_ends_where_the_uninterrupted_run_does(two_rank_plain):
    base, spec, results = two_rank_plain
    killed = dict(spec, run_dir=str(base / "resumed"), stop_after=1)
    assert _launch(2, killed, base / "killed") == {}
    for rank in (0, 1):  # the error left through distributed.session, which destroyed the process group
        assert torch.load(base / "killed" / f"stop{rank}.pt") == {"initialized": False}
    assert json.loads((base / "resumed" / "metrics.json").read_text())["history"][-1]["epoch"] == 1
    resumed = _launch(2, dict(killed, stop_after=None, resume=True), base / "again")
    for rank in (0, 1):
        assert torch.equal(_taus(resumed[rank]["history"]), _taus(results[rank]["history"]))
        for k, v in results[rank]["model"].items():
            torch.testing.assert_close(resumed[rank]["model"][k], v, rtol=0, atol=0)


def test_command_line_under_torchrun_with_batchnorm(tmp_path, digits_file):
    """``fastabsld train`` in 2 processes; cnn-s has BatchNorm (per-rank statistics: no SyncBatchNorm on the CPU)."""
    teacher_path = tmp_path / "teacher.pt"
    torch.save({"config": TrainConfig(model="cnn-s").to_dict(), "model": dist_worker.teacher().state_dict(),
                "num_classes": 10, "in_channels": 1}, teacher_path)
    argv = ["train", "--epochs", "1", "--batch-size", "64", "--steps", "1", "--train-subset", "128",
            "--teacher-path", str(teacher_path), "--test-attacks", "clean", "--run-dir", str(tmp_path / "run"),
            "--no-progress", "--eval-every", "5"]
    results, logs = _launch(2, {"argv": argv, "data": digits_file}, tmp_path / "out", with_logs=True)
    assert "best epoch on validation" in logs[0] and "best epoch" not in logs[1]
    taus = _taus(results[0]["history"])
    assert not torch.allclose(taus, torch.ones_like(taus))
    assert torch.equal(taus, _taus(results[1]["history"]))
    # Identical weights on both ranks; the running statistics are each rank's own.
    assert all(torch.equal(v, results[1]["model"][k]) for k, v in results[0]["model"].items()
               if not k.endswith(("running_mean", "running_var")))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2


def test_two_ranks_sum_the_fair_ard_counts_like_one_process(tmp_path, digits_file, monkeypatch):
    """Fair-ARD's robust-step counts are all-reduced: both ranks hold the single process's class weights."""
    config = dict(TINY, method="ard", reweight=True, model=dist_worker.PLAIN_MODEL)
    results = _launch(2, {"config": config, "run_dir": str(tmp_path / "run"), "data": digits_file}, tmp_path / "out")
    weights = [torch.tensor([e["class_weight"] for e in results[rank]["history"]]) for rank in (0, 1)]
    assert torch.equal(weights[0], weights[1])
    monkeypatch.setitem(MODELS, dist_worker.PLAIN_MODEL, dist_worker.plain_model)
    single = train(TrainConfig(**config), None, teacher=dist_worker.teacher(), data=load_digits(0), log=lambda *_: None)
    expected = torch.tensor([e["class_weight"] for e in single["history"]])
    assert not torch.allclose(expected, torch.ones_like(expected))  # the weights moved: the check has teeth
    torch.testing.assert_close(weights[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close([e["train_loss"] for e in results[0]["history"]],
                               [e["train_loss"] for e in single["history"]], rtol=1e-5, atol=1e-6)
