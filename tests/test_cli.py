"""The command line: parsing, --help, train/eval on a tiny run, and the demo's table and verdicts."""

import json
import os
import subprocess
import sys

import pytest

from fastabsld import cli
from fastabsld.demo import format_table, verdict
from tests.train_helpers import one_thread  # noqa: F401  (autouse fixture)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["demo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: fastabsld" in out
    if argv[0] == "train":
        assert "17 grey levels" in out and "--resume" in out


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "fastabsld", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "demo" in proc.stdout and "eval" in proc.stdout


def test_parse_train_arguments():
    args = cli.build_parser().parse_args(["train", "--method", "rslad", "--epochs", "3", "--eps", "0.2", "--seed", "4",
                                          "--resume", "--no-progress", "--device", "cpu", "--test-attacks", "clean"])
    assert (args.method, args.epochs, args.eps, args.seed, args.resume, args.no_progress) == ("rslad", 3, 0.2, 4,
                                                                                             True, True)
    assert args.func is cli._train and args.test_attacks == ["clean"]
    assert cli.build_parser().parse_args(["demo"]).threads == 1
    for bad in (["train", "--method", "x"], ["train", "--epochs", "0"], []):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(bad)


def test_train_eval_and_refuse_overwrite(tmp_path, capsys):
    run = str(tmp_path / "run")
    common = ["--method", "pgd-at", "--epochs", "1", "--train-subset", "64", "--steps", "1", "--run-dir", run,
              "--test-attacks", "clean", "pgd20", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(["train", *common]) == 0
    out = capsys.readouterr().out
    assert "pgd20" in out and "run folder" in out
    assert json.loads(open(os.path.join(run, "metrics.json")).read())["config"]["epochs"] == 1
    assert cli.main(["train", *common]) == 2  # refuses to overwrite without --resume
    capsys.readouterr()
    # --resume keeps the run's saved recipe (1 epoch, already done), whatever the other flags say.
    assert cli.main(["train", "--run-dir", run, "--resume", "--epochs", "5", "--no-progress",
                     "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "saved configuration (pgd-at, 1 epochs)" in capsys.readouterr().out
    assert len(json.loads(open(os.path.join(run, "metrics.json")).read())["history"]) == 1
    out_json = str(tmp_path / "eval.json")
    assert cli.main(["eval", os.path.join(run, "best.pt"), "--attacks", "clean", "fgsm", "--split", "val",
                     "--json", out_json, "--no-progress"]) == 0
    evaluation = json.loads(open(out_json).read())
    assert evaluation["split"] == "val" and set(evaluation["results"]) == {"clean", "fgsm"}
    assert len(evaluation["results"]["clean"]["per_class"]) == 10


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


def test_missing_or_unreadable_files_give_a_message_not_a_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.pt")
    assert cli.main(["eval", missing]) == 2
    assert "No such file" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint\n")
    assert cli.main(["eval", str(garbage)]) == 2
    assert "is not a fastabsld checkpoint" in capsys.readouterr().err
    assert cli.main(["train", "--teacher-path", missing, "--epochs", "1", "--train-subset", "64", "--no-progress",
                     "--run-dir", str(tmp_path / "run")]) == 2
    assert "No such file" in capsys.readouterr().err


@pytest.mark.parametrize("argv, name", [(["--eps", "-1"], "eps"), (["--alpha", "nan"], "alpha"),
                                        (["--test-attacks", "pgd"], "test_attacks")])
def test_bad_train_values_are_an_error_line_before_any_training(argv, name, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *argv, "--no-progress", "--run-dir", str(run), "--cache-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {name}")
    assert not run.exists()


def test_bad_device_and_unknown_attack_are_errors_not_tracebacks(capsys):
    assert cli.main(["train", "--device", "tpu", "--epochs", "1"]) == 2
    assert "device must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "missing.pt", "--attacks", "foo"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
