"""The demo: its verdict sentences, repeated seeds refused, and a tiny end-to-end run."""

import json

import pytest

from fastabsld.study import cli
from fastabsld.study.demo import run_demo, verdict_lines
from tests.recipe.test_cli import one_error


def _cell(diff, interval, word):
    return {"diff": diff, "diff_interval": interval, "verdict": word}


def test_verdict_lines_say_what_the_interval_says():
    summary = {"absld": {"pgd20": {"worst": _cell(0.05, [0.01, 0.09], "better"),
                                   "nsd": _cell(-0.01, [-0.03, 0.01], "no detectable difference")}}}
    worst, nsd = verdict_lines(summary)
    assert worst == ("ABSLD improved worst-class robust accuracy over RSLAD (ABSLD - RSLAD +0.050, 95% interval "
                     "[+0.010, +0.090]; significant after Holm's correction).")
    assert nsd.startswith("ABSLD did NOT detectably improve robust fairness (NSD) over RSLAD (ABSLD - RSLAD -0.010")
    assert nsd.endswith("no detectable difference.")
    summary["absld"]["pgd20"]["nsd"] = _cell(0.04, [0.02, 0.06], "worse")
    assert verdict_lines(summary)[1].startswith("ABSLD did NOT improve robust fairness (NSD): it was worse")


def test_repeated_seeds_are_an_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="must not repeat a seed"):
        run_demo(str(tmp_path / "demo"), seeds=(0, 0))
    assert cli.main(["demo", "--seeds", "0", "0", "--out", str(tmp_path / "demo")]) == 2
    one_error(capsys, "must not repeat a seed", "0 more than once")
    assert not (tmp_path / "demo").exists()


def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--seeds", "0", "--epochs", "1", "--teacher-epochs", "1", "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "trained and cached at" in printed and "rslad (reference)" in printed and "teacher " in printed
    assert "WARNING: only 1 seed: the intervals cover the evaluation noise" in printed
    assert "ABSLD did NOT detectably improve" in printed or "ABSLD did NOT improve" in printed \
        or "ABSLD improved" in printed
    summary = json.loads((out / "demo.json").read_text())
    assert summary["seeds"] == [0] and set(summary["results"]) == {"rslad", "absld"}
    cell = summary["summary"]["absld"]["pgd20"]["worst"]
    assert len(cell["diff_interval"]) == 2 and cell["verdict"] in ("better", "worse", "no detectable difference")
    assert summary["config"]["eval_every"] == 1  # the same selection schedule as train's default
    assert set(summary["teacher_test"]) == {"clean", "fgsm", "pgd20"}
    for name in ("demo.png", "per_class_robust_accuracy.png", "absld_temperatures.png", "rslad-seed0/metrics.json",
                 "absld-seed0/best.pt", "absld-seed0/predictions.npz"):
        assert (out / name).stat().st_size > 0, name
