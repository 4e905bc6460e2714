"""compare: method specs, the aggregation against hand-computed numbers, the table, and its resumable runs."""

import json
import math
import os

import pytest

from fastabsld.recipe import checkpoint, loop, report
from fastabsld.recipe import teacher as teacher_mod
from fastabsld.recipe.config import TrainConfig
from fastabsld.study import compare as compare_mod
from fastabsld.study.compare import MethodSpec, aggregate, compare, format_table, parse_method
from tests.recipe import fault_worker


def test_method_specs():
    assert parse_method("ard") == MethodSpec("ard", False)
    assert parse_method("absld+reweight") == MethodSpec("absld", True)
    assert parse_method("iad+reweight").name == "iad+reweight"
    with pytest.raises(ValueError, match="method must be one of"):
        parse_method("mart")
    with pytest.raises(ValueError, match="distils from no teacher"):
        parse_method("trades+reweight")
    with pytest.raises(ValueError, match="method must be one of"):
        parse_method("absld+fair")


def _evaluation(average, worst, nsd):
    return {"pgd20": {"average": average, "worst": worst, "nsd": nsd}}


# Three seeds of three methods; every figure below is worked out by hand from these.
RESULTS = {
    "absld": [_evaluation(0.80, 0.60, 0.20), _evaluation(0.82, 0.60, 0.20), _evaluation(0.84, 0.60, 0.20)],
    "rslad": [_evaluation(0.70, 0.50, 0.10), _evaluation(0.74, 0.62, 0.10), _evaluation(0.72, 0.56, 0.10)],
    "ard": [_evaluation(0.81, 0.60, None), _evaluation(0.80, 0.60, 0.30), _evaluation(0.86, 0.60, 0.30)],
}


def test_aggregate_against_hand_computed_figures():
    summary = aggregate(RESULTS, [0, 1, 2], ["pgd20"], "absld")
    ref, rslad, ard = (summary[name]["pgd20"] for name in ("absld", "rslad", "ard"))
    # absld average 0.80, 0.82, 0.84: mean 0.82, population std sqrt((0.02^2 + 0 + 0.02^2) / 3) = 0.0163299.
    assert ref["average"]["mean"] == pytest.approx(0.82) and ref["average"]["std"] == pytest.approx(0.0163299, abs=1e-7)
    assert ref["average"]["verdict"] == "reference" and ref["average"]["diff"] == 0.0
    # rslad - absld per seed: -0.10, -0.08, -0.12: mean -0.10 (std 0.0163299), beyond both stds (0.0163299): worse.
    assert rslad["average"]["mean"] == pytest.approx(0.72)
    assert rslad["average"]["diff"] == pytest.approx(-0.10)
    assert rslad["average"]["diff_std"] == pytest.approx(0.0163299, abs=1e-7)
    assert rslad["average"]["verdict"] == "worse"
    # rslad worst 0.50, 0.62, 0.56: mean 0.56, std sqrt((0.06^2 + 0.06^2) / 3) = 0.0489898; diff -0.04 is inside it.
    assert rslad["worst"]["std"] == pytest.approx(0.0489898, abs=1e-7)
    assert rslad["worst"]["diff"] == pytest.approx(-0.04) and rslad["worst"]["verdict"] == "within noise"
    # NSD is lower-is-better: 0.10 against 0.20 with no spread at all is better.
    assert rslad["nsd"]["diff"] == pytest.approx(-0.10) and rslad["nsd"]["verdict"] == "better"
    # ard average 0.81, 0.80, 0.86: mean 0.823333, std 0.0262467; diffs +0.01, -0.02, +0.02: mean +0.003333.
    assert ard["average"]["mean"] == pytest.approx(0.8233333, abs=1e-7)
    assert ard["average"]["std"] == pytest.approx(0.0262467, abs=1e-7)
    assert ard["average"]["diff"] == pytest.approx(0.0033333, abs=1e-7)
    assert ard["average"]["verdict"] == "within noise"
    # Identical values: no difference, no spread: within noise, as the demo's verdict says.
    assert ard["worst"]["diff"] == 0.0 and ard["worst"]["verdict"] == "within noise"
    # An undefined NSD (null in JSON) leaves the figure undefined instead of a verdict on NaN.
    assert math.isnan(ard["nsd"]["mean"]) and ard["nsd"]["verdict"] == "n/a" and math.isnan(ard["nsd"]["diff"])


def test_aggregate_needs_its_reference_and_every_seed():
    with pytest.raises(ValueError, match="reference 'trades'"):
        aggregate(RESULTS, [0, 1, 2], ["pgd20"], "trades")
    with pytest.raises(ValueError, match="3 results for 2 seeds"):
        aggregate(RESULTS, [0, 1], ["pgd20"], "absld")


def test_table_shows_spread_differences_and_verdicts():
    summary = aggregate(RESULTS, [0, 1, 2], ["pgd20"], "absld")
    table = format_table(summary, ["pgd20"], "absld", [0, 1, 2], test_size=720)
    lines = table.splitlines()
    assert lines[0].startswith("test split (720 images), 3 seeds (0, 1, 2): mean +- population std")
    row = next(line for line in lines if line.startswith("absld (reference)"))
    assert "0.820 +- 0.016" in row and "0.600 +- 0.000" in row and "0.200 +- 0.000" in row
    rslad = lines.index(next(line for line in lines if line.startswith("rslad ")))
    assert "0.720 +- 0.016" in lines[rslad]
    assert lines[rslad + 1].startswith("  - absld") and "-0.100 worse" in lines[rslad + 1]
    assert "-0.040 within noise" in lines[rslad + 1] and "-0.100 better" in lines[rslad + 1]
    ard = lines.index(next(line for line in lines if line.startswith("ard ")))
    assert "n/a" in lines[ard] and lines[ard + 1].rstrip().endswith("n/a")
    assert "PGD-20 average: worse than absld: rslad; within the seed spread of absld: ard." in lines
    assert "PGD-20 NSD (lower=fairer): better than absld: rslad; within the seed spread of absld: none." in lines


TINY = dict(epochs=2, batch_size=64, steps=1, train_subset=128, eval_every=1, val_attacks=("clean",),
            select_metric="clean.average", progress=False, teacher_model="cnn-s")


@pytest.fixture
def cached_teacher(tmp_path):
    """A cache holding the teacher of TINY (the fixed untrained one), so that nothing trains a teacher here."""
    cfg = TrainConfig(**{**compare_mod.DEFAULTS, **TINY}, cache_dir=str(tmp_path / "cache"))
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": teacher_mod.teacher_config(cfg).to_dict(),
                            "epoch": 1, "model": fault_worker.fixed_teacher().state_dict(), "num_classes": 10,
                            "in_channels": 1}, teacher_mod.teacher_cache_path(cfg))
    return dict(TINY, cache_dir=str(tmp_path / "cache"))


class _Stop(Exception):
    pass


def test_compare_trains_once_resumes_and_evaluates_what_is_missing(tmp_path, digits, cached_teacher, monkeypatch):
    monkeypatch.setattr(report, "plot_run", lambda *args, **kwargs: [])
    out = str(tmp_path / "cmp")
    options = dict(methods=["trades", "rslad+reweight"], seeds=[0, 1], reference="rslad+reweight",
                   attacks=["clean"], config=cached_teacher, data=digits, log=lambda *_: None)
    # The third run is interrupted in its second epoch (after its first checkpoint).
    step, calls = loop.train_step, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4 + 4 + 2 + 1:  # 2 batches per epoch: runs 1 and 2, then the 2nd epoch of run 3
            raise _Stop()
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", dying)
    with pytest.raises(_Stop):
        compare(out, **options)
    monkeypatch.setattr(loop, "train_step", step)
    folders = sorted(os.listdir(out))
    assert folders == ["rslad+reweight-seed0", "trades-seed0", "trades-seed1"]
    assert checkpoint.load(os.path.join(out, "rslad+reweight-seed0", "last.pt"))["epoch"] == 1

    lines = []
    first = compare(out, **dict(options, log=lines.append))
    assert first["trained"] == [os.path.join(out, n) for n in ("rslad+reweight-seed0", "rslad+reweight-seed1")]
    assert any("2 of 4 runs finished before: not trained again" in line for line in lines)
    log = open(os.path.join(out, "rslad+reweight-seed0", "train.log")).read()
    assert "resumed" in log and "after epoch 1" in log  # the interrupted run went on from its checkpoint
    assert json.load(open(os.path.join(out, "compare.json")))["methods"] == ["trades", "rslad+reweight"]
    assert os.path.getsize(os.path.join(out, "compare.png")) > 0
    history = json.load(open(os.path.join(out, "rslad+reweight-seed1", "metrics.json")))["history"]
    assert all("class_weight" in entry for entry in history)

    # Finished runs are not trained again; an attack they lack is evaluated on their kept weights.
    monkeypatch.setattr(loop, "train_step", lambda *args, **kwargs: pytest.fail("a finished run was trained again"))
    again = compare(out, **dict(options, attacks=["clean", "fgsm"]))
    assert again["trained"] == [] and len(again["reused"]) == 4
    assert first["runs"]["trades"][0]["clean"] == again["runs"]["trades"][0]["clean"]
    extra = json.load(open(os.path.join(out, "trades-seed0", compare_mod.EXTRA_EVAL_FILE)))
    assert set(extra) == {"fgsm"} and again["runs"]["trades"][0]["fgsm"]["average"] == extra["fgsm"]["average"]
    assert set(again["summary"]["trades"]) == {"clean", "fgsm"}

    # A folder holding another configuration is an error, not overwritten.
    with pytest.raises(ValueError, match="holds a run of another configuration.*lr"):
        compare(out, **dict(options, config=dict(cached_teacher, lr=0.05)))


def test_compare_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="reference 'absld' must be one of"):
        compare(str(tmp_path), methods=["ard", "rslad"])
    with pytest.raises(ValueError, match="methods must not repeat"):
        compare(str(tmp_path), methods=["ard", "ard"], reference="ard")
    with pytest.raises(ValueError, match="seeds must not be empty"):
        compare(str(tmp_path), seeds=[])
    with pytest.raises(ValueError, match="must not set 'seed'"):
        compare(str(tmp_path), config={"seed": 3})
    with pytest.raises(ValueError, match="jobs must be an integer >= 1"):
        compare(str(tmp_path), jobs=0)
    with pytest.raises(ValueError, match="unknown attack 'bogus'"):
        compare(str(tmp_path), attacks=["bogus"], config={"cache_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="must not repeat"):
        compare(str(tmp_path), attacks=["cw", "cw20"], config={"cache_dir": str(tmp_path)})  # one attack twice
    assert not os.listdir(tmp_path)


def test_compare_in_worker_processes(tmp_path, monkeypatch):
    """jobs=2: the runs train in two processes of their own (each loads the data and the teacher itself)."""
    out = str(tmp_path / "cmp")
    result = compare(out, methods=["pgd-at"], seeds=[0, 1], reference="pgd-at", attacks=["clean"], jobs=2,
                     config=dict(TINY, cache_dir=str(tmp_path / "cache")), log=lambda *_: None)
    assert sorted(result["trained"]) == [os.path.join(out, f"pgd-at-seed{s}") for s in (0, 1)]
    assert result["teacher"] is None and not os.path.exists(tmp_path / "cache")
    for seed in (0, 1):
        metrics = json.load(open(os.path.join(out, f"pgd-at-seed{seed}", "metrics.json")))
        assert metrics["config"]["seed"] == seed and metrics["test"]["clean"] == result["runs"]["pgd-at"][seed]["clean"]
