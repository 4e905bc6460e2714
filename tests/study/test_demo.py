"""The demo: its verdict against the seed spread, its table, and a tiny end-to-end run."""

import json

import pytest

from fastabsld.study import cli
from fastabsld.study.demo import format_table, verdict


def test_verdict_against_seed_spread():
    assert verdict([0.5, 0.6, 0.55], [0.7, 0.8, 0.75], True) == ("better", pytest.approx(0.2))
    assert verdict([0.5, 0.6, 0.55], [0.52, 0.62, 0.57], True)[0] == "within noise"
    assert verdict([0.2, 0.21, 0.2], [0.3, 0.31, 0.3], False)[0] == "worse"  # NSD: lower is better
    assert verdict([0.3, 0.31, 0.3], [0.2, 0.21, 0.2], False)[0] == "better"
    assert verdict([0.5], [0.9], True)[0] == "within noise"  # one seed has no spread to compare with


def test_format_table_is_honest():
    def ev(avg, worst, nsd):
        return {"clean": {"average": 0.99, "worst": 0.97, "nsd": 0.01},
                "pgd20": {"average": avg, "worst": worst, "nsd": nsd}}

    results = {"rslad": [ev(0.80, 0.60, 0.12), ev(0.81, 0.62, 0.11)],
               "absld": [ev(0.80, 0.61, 0.115), ev(0.80, 0.61, 0.115)]}
    table = format_table(results, [0, 1])
    assert "RSLAD" in table and "ABSLD" in table and "0.610 +- 0.010" in table
    assert "did NOT clearly improve worst-class robust accuracy" in table
    assert "did NOT clearly improve robust fairness (NSD)" in table
    results["absld"] = [ev(0.80, 0.75, 0.05), ev(0.80, 0.76, 0.05)]
    table = format_table(results, [0, 1])
    assert "ABSLD improved worst-class robust accuracy over RSLAD beyond the seed spread." in table
    assert "ABSLD improved robust fairness (NSD)" in table


def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--seeds", "0", "--epochs", "1", "--teacher-epochs", "1", "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "trained and cached at" in printed and "RSLAD" in printed and "PGD-20 worst-class acc." in printed
    assert "ABSLD did NOT clearly improve" in printed  # one seed has no spread: never claims a win
    summary = json.loads((out / "demo.json").read_text())
    assert summary["seeds"] == [0] and set(summary["results"]) == {"rslad", "absld"}
    for name in ("per_class_robust_accuracy.png", "absld_temperatures.png", "rslad-seed0/metrics.json",
                 "absld-seed0/best.pt"):
        assert (out / name).stat().st_size > 0, name
