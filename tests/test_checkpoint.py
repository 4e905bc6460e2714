"""Atomic checkpoint writes, RNG state round trips, and kill-and-resume equality."""

import json
import os
import random

import numpy as np
import pytest
import torch

from fastabsld import checkpoint, report
from fastabsld import train as train_mod
from fastabsld.data import load_digits
from fastabsld.models import build_model
from fastabsld.train import TrainConfig, train
from tests.train_helpers import one_thread  # noqa: F401  (autouse fixture)


class _Exploding:
    """Pickles part-way, then fails (a full disk or a kill during the write)."""

    def __reduce__(self):
        raise OSError("disk full")


def test_atomic_save_failure_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.atomic_save({"epoch": 1, "w": torch.ones(3)}, str(path))
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"epoch": 2, "w": torch.zeros(1000), "bad": _Exploding()}, str(path))
    assert os.listdir(tmp_path) == ["last.pt"]
    assert checkpoint.load(str(path))["epoch"] == 1


def test_atomic_save_failure_without_previous_file(tmp_path):
    with pytest.raises(OSError):
        checkpoint.atomic_save({"bad": _Exploding()}, str(tmp_path / "sub" / "x.pt"))
    assert os.listdir(tmp_path / "sub") == []


def test_atomic_write_text_failure(tmp_path):
    path = tmp_path / "metrics.json"
    report.write_metrics(str(tmp_path), {"a": 1})
    with pytest.raises(TypeError):
        report.write_metrics(str(tmp_path), {"a": object()})
    assert os.listdir(tmp_path) == ["metrics.json"] and json.loads(path.read_text()) == {"a": 1}
    report.write_metrics(str(tmp_path), {"a": float("inf"), "b": [float("nan"), 1.0]})
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.0]}


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    state = checkpoint.rng_state({"g": gen})
    draws = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    checkpoint.set_rng_state(state, {"g": gen})
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    assert draws[0] == again[0] and draws[1] == again[1]
    assert torch.equal(draws[2], again[2]) and torch.equal(draws[3], again[3])
    with pytest.raises(KeyError):
        checkpoint.set_rng_state(state, {"other": gen})


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("method", ["absld", "pgd-at"])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, method):
    data = load_digits(0)
    torch.manual_seed(7)
    teacher = build_model("cnn-s", 10, 1).eval()
    cfg = TrainConfig(method=method, epochs=2, batch_size=32, steps=2, train_subset=96, progress=False,
                      test_attacks=("clean",), eval_every=1, val_attacks=("clean", "pgd20"))
    quiet = dict(teacher=teacher, data=data, log=lambda *_: None)
    straight = train(cfg, str(tmp_path / "straight"), **quiet)

    # Kill the second run in the middle of epoch 2 (after its epoch-1 checkpoint), then resume.
    step = train_mod.pgd_at_step if method == "pgd-at" else train_mod.distill_step
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # 3 batches per epoch: the 2nd batch of epoch 2
            raise _Killed()
        return step(*args, **kwargs)

    name = "pgd_at_step" if method == "pgd-at" else "distill_step"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, name, dying_step)
        with pytest.raises(_Killed):
            train(cfg, str(tmp_path / "resumed"), **quiet)
    assert checkpoint.load(str(tmp_path / "resumed" / "last.pt"))["epoch"] == 1
    # Scramble the global RNGs so that only the checkpoint can restore them.
    torch.manual_seed(999)
    np.random.seed(999)
    resumed = train(cfg, str(tmp_path / "resumed"), resume=True, **quiet)

    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a = checkpoint.load(str(tmp_path / "straight" / "last.pt"))
    last_b = checkpoint.load(str(tmp_path / "resumed" / "last.pt"))
    assert all(torch.equal(v, last_b["model"][k]) for k, v in last_a["model"].items())
    if method == "absld":
        for key, value in last_a["loss_fn"].items():
            other = last_b["loss_fn"][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
        assert not torch.equal(last_a["loss_fn"]["tau_adv"], torch.ones(10))
    mom_a = [s["momentum_buffer"] for s in last_a["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in last_b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(mom_a, mom_b))

    def strip(history):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in history]

    assert strip(straight["history"]) == strip(resumed["history"]) and len(resumed["history"]) == 2
    assert straight["test"] == resumed["test"]
