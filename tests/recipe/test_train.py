"""Short end-to-end training runs on digits: the run folder, RSLAD and PGD-AT."""

import json
import math

import numpy as np
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
