"""The command line: help, arguments, train/eval round trip, and errors as one line."""

import json
import os
import subprocess
import sys

import pytest

from fastabsld.recipe import cli
from fastabsld.recipe.config import TrainConfig


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["demo", "--help"],
                                  ["compare", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: fastabsld" in out
    if argv[0] == "train":
        assert "17 grey levels" in out and "--resume" in out
        assert "--reweight" in out and "--teacher-method" in out and "--ard-temperature" in out
    if argv[0] == "compare":
        assert "pgd-at trades ard rslad absld absld+reweight" in out and "6.0 and 6.7 min in two measurements on 2 CPU cores" in out


def test_method_settings_reach_the_config():
    args = cli.build_parser().parse_args(["train", "--method", "iad", "--reweight", "--iad-warmup", "0.5",
                                          "--reweight-max", "3", "--teacher-method", "trades", "--trades-beta", "2"])
    cfg = cli.train_config(args)
    assert (cfg.method, cfg.reweight, cfg.iad_warmup, cfg.reweight_max) == ("iad", True, 0.5, 3.0)
    assert (cfg.teacher_method, cfg.trades_beta, cfg.ard_temperature) == ("trades", 2.0, 30.0)
    with pytest.raises(ValueError, match="distils from no teacher"):
        cli.train_config(cli.build_parser().parse_args(["train", "--method", "trades", "--reweight"]))


def test_compare_command(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "pgd-at", "trades", "--reference", "pgd-at", "--seeds", "0", "--epochs", "1", "--train-subset",
            "64", "--steps", "1", "--eval-every", "1", "--attacks", "clean", "--jobs", "1", "--out", str(out),
            "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "pgd-at (reference)" in printed and "  - pgd-at" in printed and "compare.json" in printed
    summary = json.loads((out / "compare.json").read_text())
    assert summary["methods"] == ["pgd-at", "trades"] and summary["config"]["epochs"] == 1
    assert summary["config"]["train_subset"] == 64 and (out / "trades-seed0" / "best.pt").exists()
    assert cli.main(argv) == 0 and "2 of 2 runs finished before" in capsys.readouterr().out
    assert cli.main(["compare", "trades+reweight", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: method spec 'trades+reweight'") and err.count("\n") == 1


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


def test_cli_speed_flags_reach_the_config():
    """The speed flags land in the TrainConfig that 'train' runs (and the defaults stay on for folding)."""
    parser = cli.build_parser()
    cfg = cli.train_config(parser.parse_args(["train", "--amp", "--channels-last", "--compile", "--no-fold-bn"]))
    assert isinstance(cfg, TrainConfig)
    assert (cfg.amp, cfg.channels_last, cfg.compile, cfg.fold_bn) == (True, True, True, False)
    default = cli.train_config(parser.parse_args(["train"]))
    assert default == TrainConfig(progress=True)
    assert (default.amp, default.channels_last, default.compile, default.fold_bn) == (False, False, False, True)
