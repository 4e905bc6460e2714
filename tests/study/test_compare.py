"""compare: method specs, the table (intervals, verdicts, the teacher, flags), and its resumable runs."""

import json
import os

import numpy as np
import pytest

from fastabsld.recipe import checkpoint, loop, report
from fastabsld.recipe import teacher as teacher_mod
from fastabsld.recipe.config import TrainConfig
from fastabsld.study import compare as compare_mod
from fastabsld.study import report as study_report
from fastabsld.study import statistics
from fastabsld.study.compare import MethodSpec, compare, parse_method
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


def _study(seed=0):
    """Three methods x three seeds on 4 classes of 30 test images: rslad right wherever absld is and more."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), 30)
    absld = rng.random((3, 120)) < 0.5
    rslad = absld | (rng.random((3, 120)) < 0.6)
    return statistics.make_study(labels, {"absld": {"pgd20": absld}, "rslad": {"pgd20": rslad},
                                          "ard": {"pgd20": absld.copy()}}, [0, 1, 2], 4)


def test_table_shows_intervals_verdicts_teacher_and_flags():
    study = _study()
    stats = statistics.summarise(study, "absld", n_resamples=2000)
    teacher = {"pgd20": {"average": 0.9, "worst": 0.8, "nsd": 0.05}}
    cfg = TrainConfig(eval_every=1)
    table = study_report.format_table(stats, ["pgd20"], "absld", [0, 1, 2], class_counts=study.class_counts,
                                      teacher=teacher, flags=["rslad: still improving"],
                                      selection=study_report.selection(cfg))
    lines = table.splitlines()
    assert lines[0] == "test split: 120 images (30 per class); 3 seeds (0, 1, 2)"
    assert lines[1] == f"kept weights: best validation {cfg.select_metric}, evaluated every epoch (as train's default)"
    assert "correction over the table's 6 comparisons" in table and "WARNING" not in table
    assert next(line for line in lines if line.startswith("teacher")).split() == ["teacher", "0.900", "0.800", "0.050"]
    ref = stats["summary"]["absld"]["pgd20"]["average"]
    row = next(line for line in lines if line.startswith("absld (reference)"))
    assert f"{ref['mean']:.3f} [{ref['interval'][0]:.3f}, {ref['interval'][1]:.3f}]" in row
    rslad = lines.index(next(line for line in lines if line.startswith("rslad ")))
    diff = stats["summary"]["rslad"]["pgd20"]["average"]
    assert lines[rslad + 1].startswith("  - absld") and f"{diff['diff']:+.3f} [{diff['diff_interval'][0]:+.3f}" in \
        lines[rslad + 1]
    assert lines[rslad + 2].split()[:2] == ["better", "better"]  # average and worst class
    ard = lines.index(next(line for line in lines if line.startswith("ard ")))
    assert "+0.000 [+0.000, +0.000]" in lines[ard + 1] and lines[ard + 2].strip().startswith("no detectable difference")
    assert "PGD-20 average: better than absld: rslad; no detectable difference from absld: ard." in lines
    assert lines[-2:] == ["flags:", "  rslad: still improving"]
    two = statistics.summarise(statistics.make_study(study.labels, {m: {"pgd20": v["pgd20"][:2]}
                                                                    for m, v in study.correct.items()}, [0, 1], 4),
                               "absld", n_resamples=500)
    two_table = study_report.format_table(two, ["pgd20"], "absld", [0, 1], class_counts=study.class_counts)
    assert "WARNING: only 2 seeds: the intervals cover the evaluation noise" in two_table
    assert "every 5 epochs and after the last (unlike train's default)" in study_report.selection(
        TrainConfig(eval_every=5))


def test_student_flags():
    stats = statistics.summarise(_study(), "absld", n_resamples=500)["summary"]
    as_clean = {name: {"clean": stats[name]["pgd20"]} for name in ("absld", "rslad")}
    flags = compare_mod.student_flags(as_clean, {"absld": [5, 3, 5], "rslad": [2, 3, 4]}, 5,
                                      {"clean": {"average": 0.95, "worst": 0.9, "nsd": 0.02}})
    assert flags[0].startswith("absld: still improving at the last epoch in 2 of 3 seeds")
    absld_clean = stats["absld"]["pgd20"]["average"]["mean"]  # about 0.5: far below 0.95
    assert f"absld: clean accuracy {absld_clean:.3f}, {0.95 - absld_clean:.3f} below the teacher's 0.950" in flags[1]
    assert not any(flag.startswith("rslad: still") for flag in flags)
    assert compare_mod.student_flags({"absld": {}}, {"absld": [1]}, 5, None) == []


def test_repeated_seeds_are_an_error():
    with pytest.raises(ValueError, match="must not repeat a seed"):
        compare("unused", seeds=[0, 0])


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
