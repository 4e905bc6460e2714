"""The epoch loop: a run of any method killed in the middle of an epoch resumes to the uninterrupted run's state."""

import numpy as np
import pytest
import torch

from fastabsld.recipe import checkpoint, loop
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.data import load_digits
from fastabsld.recipe.models import build_model
from fastabsld.recipe.train import train


class _Killed(BaseException):
    pass


def _same_state(a, b, key):
    assert (a is None) == (b is None) and (a is None or a.keys() == b.keys()), key
    for name, value in (a or {}).items():
        other = b[name]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, f"{key}.{name}"


# IAD's warm-up is its first epoch: the kill falls into the introspective second one.
@pytest.mark.parametrize("method,reweight", [("absld", False), ("pgd-at", False), ("trades", False), ("ard", False),
                                             ("iad", False), ("ard", True), ("absld", True)],
                         ids=["absld", "pgd-at", "trades", "ard", "iad", "ard+reweight", "absld+reweight"])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, method, reweight):
    data = load_digits(0)
    torch.manual_seed(7)
    teacher = build_model("cnn-s", 10, 1).eval()
    cfg = TrainConfig(method=method, reweight=reweight, epochs=2, batch_size=32, steps=2, train_subset=96,
                      progress=False, test_attacks=("clean",), eval_every=1, val_attacks=("clean", "pgd20"),
                      iad_warmup=0.5)
    quiet = dict(teacher=teacher, data=data, log=lambda *_: None)
    straight = train(cfg, str(tmp_path / "straight"), **quiet)

    # Kill the second run in the middle of epoch 2 (after its epoch-1 checkpoint), then resume.
    step = loop.train_step
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # 3 batches per epoch: the 2nd batch of epoch 2
            raise _Killed()
        return step(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "train_step", dying_step)
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
    _same_state(last_a["loss_fn"], last_b["loss_fn"], "loss_fn")
    _same_state(last_a["reweight"], last_b["reweight"], "reweight")
    if method == "absld":
        assert not torch.equal(last_a["loss_fn"]["tau_adv"], torch.ones(10))
    if method == "iad":
        assert last_a["loss_fn"]["_extra_state"] == {"epoch": 1}
        assert [e["introspective"] for e in straight["history"]] == [False, True]
    if reweight:  # the class weights moved: comparing them has teeth
        assert not torch.equal(last_a["reweight"]["class_weight"], torch.ones(10))
    mom_a = [s["momentum_buffer"] for s in last_a["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in last_b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(mom_a, mom_b))

    def strip(history):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in history]

    assert strip(straight["history"]) == strip(resumed["history"]) and len(resumed["history"]) == 2
    assert straight["test"] == resumed["test"]


def test_checkpoints_hold_plain_data_only(tmp_path):
    """The validation figures are plain dicts: best.pt loads weights-only (as a cached teacher is)."""
    torch.manual_seed(0)
    cfg = TrainConfig(method="pgd-at", epochs=1, batch_size=32, steps=1, train_subset=64, progress=False,
                      test_attacks=("clean",), eval_every=1, val_attacks=("clean",), select_metric="clean.average")
    train(cfg, str(tmp_path / "run"), data=load_digits(0), log=lambda *_: None)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert type(best["val"]) is dict and type(last["history"][0]["val"]) is dict
