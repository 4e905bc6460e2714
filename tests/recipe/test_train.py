"""Short end-to-end training runs on digits: the run folder, RSLAD and PGD-AT, own data, models and streaming."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.models import build_model
from fastabsld.recipe.train import train

TINY = dict(epochs=2, batch_size=64, steps=2, train_subset=128, progress=False, test_attacks=("clean", "pgd20"))


def _teacher():
    torch.manual_seed(123)
    return build_model("cnn-s", 10, 1).eval()


def test_end_to_end_absld_run_folder(tmp_path, digits):
    cfg = TrainConfig(method="absld", **TINY)
    result = train(cfg, str(tmp_path), teacher=_teacher(), data=digits, log=lambda *_: None)
    for name in ("metrics.json", "last.pt", "best.pt", "per_class.png", "temperatures.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["method"] == "absld" and len(metrics["history"]) == 2
    for entry in metrics["history"]:
        assert math.isfinite(entry["train_loss"]) and entry["train_loss"] > 0
        assert len(entry["tau_adv"]) == 10 and len(entry["tau_nat"]) == 10
        assert set(entry["val"]) == {"clean", "pgd20"}
    # The temperatures moved (risks differ across classes) and stay in the clip range.
    taus = np.array(metrics["history"][-1]["tau_adv"])
    assert not np.allclose(taus, 1.0) and np.all((taus >= 0.5) & (taus <= 5.0))
    assert set(metrics["test"]) == {"clean", "pgd20"}
    assert len(metrics["test"]["pgd20"]["per_class"]) == 10
    assert metrics["best"]["epoch"] in (1, 2)
    # The returned model holds the selected (best) weights.
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert all(torch.equal(v, result["model"].state_dict()[k]) for k, v in best["model"].items())


def test_rslad_keeps_unit_temperatures_and_pgd_at_runs(digits):
    rslad = train(TrainConfig(method="rslad", **TINY), None, teacher=_teacher(), data=digits, log=lambda *_: None)
    assert all(t == 1.0 for t in rslad["history"][-1]["tau_adv"] + rslad["history"][-1]["tau_nat"])
    pgd_at = train(TrainConfig(method="pgd-at", **dict(TINY, epochs=1)), None, data=digits, log=lambda *_: None)
    assert "tau_adv" not in pgd_at["history"][0] and math.isfinite(pgd_at["history"][0]["train_loss"])


def _same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_own_datasets_student_and_teacher_in_python(digits):
    """Datasets of the same images train exactly as the built-in splits; a student module as its registered name."""
    cfg = TrainConfig(method="absld", dataset="custom", model="cnn-s", **dict(TINY, epochs=1, train_subset=None))
    splits = {name: getattr(digits, name) for name in ("train", "val", "test")}
    splits["train"] = (splits["train"][0][:128], splits["train"][1][:128])
    reference = train(cfg, None, teacher=_teacher(), data=dict(splits), log=lambda *_: None)
    datasets = {name: torch.utils.data.TensorDataset(*split) for name, split in splits.items()}
    torch.manual_seed(cfg.seed)
    student = build_model("cnn-s", 10, 1)
    ours = train(cfg, None, teacher=_teacher(), data=datasets, student=student, log=lambda *_: None)
    assert ours["model"] is student and _same_weights(ours["model"], reference["model"])
    assert ours["test"] == reference["test"] and ours["teacher"]["source"] == "module"
    with pytest.raises(ValueError, match="student must be an nn.Module"):
        train(cfg, None, teacher=_teacher(), data=datasets, student="cnn-s", log=lambda *_: None)


def test_a_streamed_dataset_trains_and_resumes_exactly(tmp_path, digits):
    """A data set too large for memory (in_memory_mb=0 here) streams through a DataLoader; a resume continues the
    order exactly: one epoch, then a resume to two, is the two-epoch run."""
    train_split = torch.utils.data.TensorDataset(digits.train[0][:96], digits.train[1][:96])
    data = {"train": train_split, "val": (digits.val[0][:60], digits.val[1][:60]),
            "test": (digits.test[0][:60], digits.test[1][:60])}
    cfg = TrainConfig(method="rslad", dataset="custom", model="cnn-s", epochs=2, batch_size=32, steps=1, progress=False,
                      in_memory_mb=0, test_attacks=("clean",), val_attacks=("clean",), select_metric="clean.average",
                      milestones=(0.9,))
    quiet = dict(teacher=_teacher(), data=data, num_classes=10, log=lambda *_: None)
    straight = train(cfg, str(tmp_path / "straight"), **quiet)
    train(dataclasses.replace(cfg, epochs=1), str(tmp_path / "resumed"), **quiet)
    torch.manual_seed(999)  # only the checkpoint can restore the order
    resumed = train(cfg, str(tmp_path / "resumed"), resume=True, **quiet)
    assert _same_weights(straight["model"], resumed["model"])
    assert [e["train_loss"] for e in straight["history"]] == [e["train_loss"] for e in resumed["history"]]


def test_the_final_test_runs_the_sanity_checks(tmp_path, digits, monkeypatch):
    """train's final test gets eval's adversarial-evaluation checks: on the same examples, logged and recorded."""
    from fastabsld import sanity

    seen = {}

    def check(correct):
        seen.update(correct)
        return [sanity.SanityWarning("order", "pgd20 above fgsm", ("fgsm", "pgd20"), 0.001)]

    monkeypatch.setattr(sanity, "check", check)
    lines = []
    cfg = TrainConfig(method="pgd-at", **{**TINY, "test_attacks": ("clean", "fgsm", "pgd20")})
    train(cfg, str(tmp_path), data=digits, log=lines.append)
    assert set(seen) == {"clean", "fgsm", "pgd20"} and len({len(v) for v in seen.values()}) == 1
    assert "warning: pgd20 above fgsm" in lines
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["sanity"]["warnings"][0]["check"] == "order"
