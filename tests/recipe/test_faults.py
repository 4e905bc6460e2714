"""Faults a training run must survive: SIGKILL anywhere, damaged checkpoints, a killed teacher training, NaN.

The kill points are drawn at random (the seed is in every failure message; ``FASTABSLD_FAULT_SEED``
replays one); each killed process is a real process (see ``fault_worker``) and the resumed run must
end bit for bit where the uninterrupted one does.
"""

import errno
import dataclasses
import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch

from fastabsld.recipe import checkpoint, cli, loop, report
from fastabsld.recipe import teacher as teacher_mod
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.errors import CheckpointError, NonFiniteLossError, TeacherChangedError, WriteError
from fastabsld.recipe.models import build_model
from fastabsld.recipe.teachers import weights_digest
from fastabsld.recipe.teacher import get_teacher, teacher_cache_path
from fastabsld.recipe.train import train
from tests.recipe import fault_worker
from tests.recipe.conftest import full_disk, run_process

# 3 batches per epoch, a validation of 1 batch (clean + FGSM) after every epoch, a test of 3 batches.
TINY = dict(method="absld", epochs=3, batch_size=32, steps=2, train_subset=96, progress=False, eval_every=1,
            val_attacks=("clean", "fgsm"), select_metric="fgsm.average", test_attacks=("clean", "fgsm"))
# The methods the SIGKILL test runs: ABSLD's temperatures; TRADES, a method without teacher; IAD (its epoch in
# the loss state, past a warm-up of one epoch) with Fair-ARD's class weights.
KILLED = {"absld": TINY, "trades": dict(TINY, method="trades"),
          "iad+reweight": dict(TINY, method="iad", reweight=True, iad_warmup=0.5)}


def _quiet(*args):
    pass


@pytest.fixture(autouse=True, scope="module")
def no_plots():
    """Plots are not under test here (tests/recipe/test_report.py has them) and cost a second per run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "plot_run", lambda *args, **kwargs: [])
        yield


def _seed():
    return int(os.environ.get("FASTABSLD_FAULT_SEED", random.SystemRandom().randrange(10 ** 6)))


def _same(a, b, path="state"):
    """Asserts that two nested checkpoint states are identical (tensors and arrays bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


def _strip(history):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in history]


def _same_final_state(run_a, run_b):
    """The two run folders' last.pt agree on everything a run carries on with (but the wall-clock seconds)."""
    a, b = (checkpoint.load(os.path.join(run, "last.pt")) for run in (run_a, run_b))
    for key in ("epoch", "model", "optimizer", "scheduler", "loss_fn", "beta", "reweight", "rng", "best", "config"):
        _same(a[key], b[key], key)
    assert _strip(a["history"]) == _strip(b["history"])


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, digits):
    """The uninterrupted run of a config of KILLED (its folder and result), trained once per module."""
    runs = {}

    def straight_run(name):
        if name not in runs:
            run_dir = str(tmp_path_factory.mktemp("straight") / "run")
            runs[name] = run_dir, train(TrainConfig(**KILLED[name]), run_dir, teacher=fault_worker.fixed_teacher(),
                                        data=digits, log=_quiet)
        return runs[name]

    return straight_run


@pytest.fixture(scope="module")
def straight(straight_runs):
    """The uninterrupted run of TINY (its folder and result)."""
    return straight_runs("absld")


@pytest.mark.parametrize("name", list(KILLED))
def test_sigkill_at_random_points_resumes_bit_identically(tmp_path, straight_runs, saved_digits, forkserver, name):
    seed = _seed()
    rng = random.Random(seed)
    why = f"FASTABSLD_FAULT_SEED={seed} replays this"
    run_dir = str(tmp_path / "run")
    # Each process resumes the previous one's folder and is killed in its phase; every kill happens before the
    # epoch's last.pt is in place, so each process finds the events its own kill needs.
    kills = [("train", rng.randint(1, 6)), ("write", rng.randint(1, 2)), ("rotate", rng.randint(1, 2)),
             ("val", rng.randint(1, 2)), ("test", rng.randint(1, 6)), None]
    for i, kill in enumerate(kills):
        out = tmp_path / f"p{i}"
        out.mkdir()
        spec = {"data": saved_digits, "out": str(out), "config": KILLED[name], "run_dir": run_dir, "resume": i > 0,
                "kill": None if kill is None else {"phase": kill[0], "nth": kill[1]}}
        code = run_process(forkserver, fault_worker.run, spec)
        if kill is None:
            assert code == 0, why
        else:
            assert code == -9 and (out / "killed.json").exists(), f"{kill} did not kill process {i} ({why})"
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")], why

    resumed = torch.load(tmp_path / f"p{len(kills) - 1}" / "result.pt", weights_only=False)
    straight_dir, result = straight_runs(name)
    _same(result["model"].state_dict(), resumed["model"], "returned model")
    assert _strip(result["history"]) == _strip(resumed["history"]), why
    assert result["test"] == resumed["test"], why
    _same_final_state(straight_dir, run_dir)
    last = checkpoint.load(os.path.join(run_dir, "last.pt"))
    # The method's state moved: comparing it has teeth.
    if name == "absld":
        assert not torch.equal(last["loss_fn"]["tau_adv"], torch.ones_like(last["loss_fn"]["tau_adv"]))
    if name == "iad+reweight":
        assert last["loss_fn"]["_extra_state"] == {"epoch": 2}
        assert not torch.equal(last["reweight"]["class_weight"], torch.ones(10))
        assert [e["introspective"] for e in result["history"]] == [False, True, True]


def _flip_two_bytes(path):
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    data[middle + 1] ^= 0x01
    open(path, "wb").write(bytes(data))


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size * 2 // 3)


@pytest.mark.parametrize("damage", [_flip_two_bytes, _truncate], ids=["flipped", "truncated"])
def test_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, digits, damage):
    straight_dir, result = straight
    run_dir = str(tmp_path / "run")
    shutil.copytree(straight_dir, run_dir)
    damage(os.path.join(run_dir, "last.pt"))
    with pytest.raises(CheckpointError, match="last.pt"):
        checkpoint.load(os.path.join(run_dir, "last.pt"))
    lines = []
    resumed = train(TrainConfig(**TINY), run_dir, resume=True, teacher=fault_worker.fixed_teacher(), data=digits,
                    log=lines.append)
    fell_back = [line for line in lines if "falling back to" in line]
    assert len(fell_back) == 1 and "last.prev.pt (epoch 2)" in fell_back[0] and "last.pt" in fell_back[0]
    assert f"resumed {run_dir} after epoch 2 (from {os.path.join(run_dir, 'last.prev.pt')})" in lines
    # The lost epoch was trained again: the run ends where the undamaged one did.
    _same(result["model"].state_dict(), resumed["model"].state_dict(), "model")
    assert result["test"] == resumed["test"]
    _same_final_state(straight_dir, run_dir)


def test_damaged_best_checkpoint_falls_back_to_the_previous_one(tmp_path, digits, monkeypatch):
    # Every validation improves on the last one, so best.pt holds epoch 3 and best.prev.pt epoch 2.
    calls = []

    def rising(cfg, val):
        calls.append(1)
        return float(len(calls))

    monkeypatch.setattr(loop, "_selection_value", rising)
    teacher = fault_worker.fixed_teacher()
    first = str(tmp_path / "first")
    result = train(TrainConfig(**TINY), first, teacher=teacher, data=digits, log=_quiet)
    assert result["best"]["epoch"] == 3 and checkpoint.load(os.path.join(first, "best.prev.pt"))["epoch"] == 2

    # last.pt and best.pt damaged: the run resumes after epoch 2 with epoch 2's kept weights, and ends as before.
    both = str(tmp_path / "both")
    shutil.copytree(first, both)
    _flip_two_bytes(os.path.join(both, "last.pt"))
    _flip_two_bytes(os.path.join(both, "best.pt"))
    calls.clear()
    calls.extend([1, 1])
    lines = []
    again = train(TrainConfig(**TINY), both, resume=True, teacher=teacher, data=digits, log=lines.append)
    assert any("best.pt is corrupt" in line for line in lines)
    assert any(f"falling back to {os.path.join(both, 'best.prev.pt')}" in line for line in lines)
    _same(result["model"].state_dict(), again["model"].state_dict(), "model")
    assert again["best"] == result["best"]

    # best.pt alone damaged in a finished run: the kept weights are now best.prev.pt's, and the run says so.
    only = str(tmp_path / "only")
    shutil.copytree(first, only)
    prev = checkpoint.load(os.path.join(only, "best.prev.pt"))
    _flip_two_bytes(os.path.join(only, "best.pt"))
    monkeypatch.undo()
    lines = []
    kept = train(TrainConfig(**TINY), only, resume=True, teacher=teacher, data=digits, log=lines.append)
    assert any("weights of the best epoch 3 are lost" in line and "best.prev.pt" in line for line in lines)
    assert kept["best"]["epoch"] == 2
    _same(prev["model"], kept["model"].state_dict(), "model")


def test_no_usable_checkpoint_is_one_error_naming_both_files(tmp_path, straight, digits):
    run_dir = str(tmp_path / "run")
    shutil.copytree(straight[0], run_dir)
    _flip_two_bytes(os.path.join(run_dir, "last.pt"))
    _truncate(os.path.join(run_dir, "last.prev.pt"))
    with pytest.raises(CheckpointError) as error:
        train(TrainConfig(**TINY), run_dir, resume=True, teacher=fault_worker.fixed_teacher(), data=digits,
              log=_quiet)
    message = str(error.value)
    assert "\n" not in message and "last.pt" in message and "last.prev.pt" in message and "corrupt" in message


def test_cli_resume_of_damaged_checkpoints_is_an_error_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_text("not a checkpoint\n")
    assert cli.main(["train", "--run-dir", str(run_dir), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "last.pt is not a fastabsld checkpoint" in err


def test_sigkill_during_teacher_training_resumes_it(tmp_path, digits, saved_digits, forkserver, monkeypatch):
    killed = dict(teacher_epochs=2, steps=1, batch_size=128, progress=False, cache_dir=str(tmp_path / "cache"))
    # 7 batches per teacher epoch: a step of epoch 2, after epoch 1's checkpoint.
    nth = random.Random(_seed()).randint(8, 14)
    spec = {"data": saved_digits, "out": str(tmp_path), "teacher_of": killed, "kill": {"phase": "train", "nth": nth},
            "cheap_evaluation": True}
    monkeypatch.setattr(loop, "evaluate", fault_worker.cheap_evaluate(loop.evaluate))
    assert run_process(forkserver, fault_worker.run, spec) == -9
    run_dir = os.path.splitext(teacher_cache_path(TrainConfig(**killed)))[0] + "-run"
    assert checkpoint.load(os.path.join(run_dir, "last.pt"))["epoch"] == 1

    steps, step = [], loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: steps.append(1) or step(*a, **k))
    lines = []
    resumed = get_teacher(TrainConfig(**killed), data=digits, log=lines.append)
    assert len(steps) == 7, "the teacher's training started again instead of resuming after epoch 1"
    assert any(line.startswith("resuming the training of the robust teacher") for line in lines)
    assert any(line.startswith(f"resumed {run_dir} after epoch 1") for line in lines)
    # The resumed training ended like any other: the teacher is cached, its run folder keeps only last.pt.
    assert os.path.exists(teacher_cache_path(TrainConfig(**killed))) and not resumed.training
    assert sorted(n for n in os.listdir(run_dir) if n.endswith(".pt")) == ["last.pt"]
    assert checkpoint.load(os.path.join(run_dir, "last.pt"))["epoch"] == 2


def test_resume_from_another_directory_reuses_the_recorded_teacher(tmp_path, digits, monkeypatch):
    """The cache path is relative; the run records it absolute, so a resume elsewhere finds the same teacher."""
    cfg = TrainConfig(**dict(TINY, epochs=2, test_attacks=("clean",)), cache_dir=".cache", teacher_model="cnn-s")
    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.chdir(first)
    # A cached teacher (the fixed teacher's weights), so that nothing trains one here.
    tcfg = teacher_mod.teacher_config(cfg)
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": tcfg.to_dict(), "epoch": 1,
                            "model": fault_worker.fixed_teacher().state_dict(), "num_classes": 10,
                            "in_channels": 1}, teacher_cache_path(cfg))
    run_dir = str(tmp_path / "run")

    class Stop(Exception):
        pass

    step = loop.train_step
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # epoch 2
            raise Stop()
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", dying)
    with pytest.raises(Stop):
        train(cfg, run_dir, data=digits, log=_quiet)
    recorded = json.loads(open(os.path.join(run_dir, "metrics.json")).read())["teacher"]["path"]
    assert recorded == os.path.abspath(teacher_cache_path(cfg)) and os.path.isabs(recorded)
    monkeypatch.setattr(loop, "train_step", step)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def no_training(*args, **kwargs):
        raise AssertionError("the resumed run trained a new teacher instead of reusing the recorded one")

    monkeypatch.setattr(teacher_mod, "fit", no_training)
    lines = []
    resumed = train(cfg, run_dir, resume=True, data=digits, log=lines.append)
    assert len(resumed["history"]) == 2 and not (elsewhere / ".cache").exists()
    assert resumed["teacher"]["path"] == recorded


def _poison_at(monkeypatch, nth):
    """From the nth training step on, the student's first weight is NaN (as after a diverged update)."""
    step, calls = loop.train_step, []

    def poisoned(student, *args, **kwargs):
        calls.append(1)
        if len(calls) >= nth:
            with torch.no_grad():
                next(student.parameters()).view(-1)[0] = math.nan
        return step(student, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", poisoned)


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, digits, monkeypatch):
    _poison_at(monkeypatch, 5)  # the 2nd batch of epoch 2
    run_dir = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError) as error:
        train(TrainConfig(**TINY), run_dir, teacher=fault_worker.fixed_teacher(), data=digits, log=_quiet)
    message = str(error.value)
    assert error.value.epoch == 2 and message.startswith("epoch 2: ") and "2 of 3 batches" in message
    assert "last.pt keeps the last finite epoch (1)" in message
    last = checkpoint.load(os.path.join(run_dir, "last.pt"))
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())
    assert not os.path.exists(os.path.join(run_dir, "last.prev.pt"))  # nothing of epoch 2 was written
    metrics = json.loads(open(os.path.join(run_dir, "metrics.json")).read())
    assert metrics["stopped"]["epoch"] == 2 and len(metrics["history"]) == 1


def test_nonfinite_loss_warns_and_goes_on_when_asked(tmp_path, digits, monkeypatch):
    _poison_at(monkeypatch, 5)
    lines = []
    result = train(TrainConfig(**TINY, on_nonfinite="warn"), str(tmp_path / "run"),
                   teacher=fault_worker.fixed_teacher(), data=digits, log=lines.append)
    warnings = [line for line in lines if line.startswith("warning: epoch")]
    assert len(warnings) == 2 and "epoch 2: the training loss was NaN or infinite in 2 of 3 batches" in warnings[0]
    assert [e.get("nonfinite_batches") for e in result["history"]] == [None, 2, 3]


def test_cli_nonfinite_loss_is_an_error_line_and_a_failure_status(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--method", "pgd-at", "--epochs", "3", "--train-subset", "256", "--batch-size", "64",
            "--steps", "1", "--lr", "1e5", "--test-attacks", "clean", "--run-dir", str(run_dir), "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: epoch ") and "NaN or infinite" in err and err.count("\n") == 1
    if (run_dir / "last.pt").exists():
        assert all(torch.isfinite(v).all() for v in checkpoint.load(str(run_dir / "last.pt"))["model"].values())
    assert cli.main(argv + ["--on-nonfinite", "warn", "--run-dir", str(tmp_path / "warned")]) == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_is_a_write_error_and_the_run_resumes_bit_identically_after(tmp_path, straight, digits,
                                                                                 monkeypatch):
    straight_dir, _ = straight
    run_dir = str(tmp_path / "run")
    disk = full_disk(monkeypatch, "last.pt", 2)  # epoch 2's checkpoint does not fit
    with pytest.raises(WriteError) as error:
        train(TrainConfig(**TINY), run_dir, teacher=fault_worker.fixed_teacher(), data=digits, log=_quiet)
    assert error.value.errno == errno.ENOSPC and isinstance(error.value, OSError)
    assert str(error.value).startswith(f"cannot write {os.path.join(run_dir, 'last.pt')}: No space left on device")
    # Nothing lost: epoch 1's checkpoint is whole, no temporary file is left.
    assert checkpoint.verify(os.path.join(run_dir, "last.pt"))
    assert checkpoint.load(os.path.join(run_dir, "last.pt"))["epoch"] == 1
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]
    disk["full"] = False  # space freed
    train(TrainConfig(**TINY), run_dir, resume=True, teacher=fault_worker.fixed_teacher(), data=digits, log=_quiet)
    _same_final_state(straight_dir, run_dir)


def _cache_teacher(cfg, seed):
    """Caches an untrained cnn-s of ``seed`` as ``cfg``'s teacher; returns its weights' digest."""
    torch.manual_seed(seed)
    model = build_model("cnn-s", 10, 1).eval()
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": teacher_mod.teacher_config(cfg).to_dict(),
                            "epoch": 1, "model": model.state_dict(), "num_classes": 10, "in_channels": 1},
                           teacher_cache_path(cfg))
    return weights_digest(model)


def test_a_resume_with_another_teacher_is_an_error_naming_both_hashes_unless_accepted(tmp_path, digits):
    cfg = TrainConfig(**dict(TINY, epochs=1, test_attacks=("clean",)), cache_dir=str(tmp_path / "cache"),
                      teacher_model="cnn-s")
    first = _cache_teacher(cfg, 7)
    run_dir = str(tmp_path / "run")
    train(cfg, run_dir, data=digits, log=_quiet)
    assert checkpoint.load(os.path.join(run_dir, "last.pt"))["teacher"]["weights_sha256"] == first
    # Another teacher where the run's was (a copy over the cached file): the resume must not distil from it silently.
    second = _cache_teacher(cfg, 8)
    assert second != first
    longer = dataclasses.replace(cfg, epochs=2)
    before = open(os.path.join(run_dir, "last.pt"), "rb").read()
    with pytest.raises(TeacherChangedError) as error:
        train(longer, run_dir, resume=True, data=digits, log=_quiet)
    assert first in str(error.value) and second in str(error.value) and "--accept-teacher-change" in str(error.value)
    assert open(os.path.join(run_dir, "last.pt"), "rb").read() == before
    lines = []
    result = train(longer, run_dir, resume=True, data=digits, log=lines.append, accept_teacher_change=True)
    assert len(result["history"]) == 2 and any("the teacher changed" in line for line in lines)
    for recorded in (json.loads(open(os.path.join(run_dir, "metrics.json")).read()),
                     checkpoint.load(os.path.join(run_dir, "last.pt"))):
        assert recorded["teacher"]["weights_sha256"] == second
        (change,) = recorded["teacher_changes"]
        assert (change["epoch"], change["from"]["weights_sha256"], change["to"]["weights_sha256"]) == (2, first, second)
        assert change["from"]["path"] == change["to"]["path"] == os.path.abspath(teacher_cache_path(cfg))
    # The change stays on record through later resumes with the (now accepted) teacher.
    again = train(dataclasses.replace(cfg, epochs=3), run_dir, resume=True, data=digits, log=_quiet)
    assert len(again["teacher_changes"]) == 1 and len(again["history"]) == 3
