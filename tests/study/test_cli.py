"""The study's commands, ``demo`` and ``compare``, in the ``fastabsld`` program: help, a tiny compare, its errors as
one line with exit status 2, and Ctrl-C."""

import json
import subprocess
import sys

import pytest

from fastabsld.recipe import cli as recipe_cli
from fastabsld.recipe.config import DEFAULT_TEACHER_EPOCHS, TrainConfig
from fastabsld.study import cli
from tests.recipe.test_cli import one_error


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["compare", "--help"]])
def test_help(argv, capsys):
    assert cli.main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: fastabsld" in out
    if argv[0] == "compare":
        assert "pgd-at trades ard rslad absld absld+reweight" in out
        assert "6.0, 6.7 and 6.0 min in three measurements on 2 CPU cores" in out and "Holm" in out


def test_the_program_has_every_command_and_the_recipe_alone_has_its_own():
    assert {"train", "eval", "demo", "compare"} <= set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert set(recipe_cli.build_parser()._subparsers._group_actions[0].choices) == {"train", "eval"}


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "fastabsld", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "demo" in proc.stdout and "eval" in proc.stdout and "compare" in proc.stdout


def test_demo_defaults():
    demo = cli.build_parser().parse_args(["demo"])
    assert demo.threads == 1
    assert demo.teacher_epochs == DEFAULT_TEACHER_EPOCHS == TrainConfig().teacher_epochs


def test_compare_command(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "pgd-at", "trades", "--reference", "pgd-at", "--seeds", "0", "--epochs", "1", "--train-subset",
            "64", "--steps", "1", "--eval-every", "1", "--attacks", "clean", "--jobs", "1", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
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


@pytest.mark.parametrize("argv, fragments", [
    (["compare", "absld", "--attacks", "pgd0"], ["attack"]),
    (["compare", "absld", "--seed", "3"], ["unrecognized arguments: --seed"]),  # not --seeds: no abbreviations
])
def test_bad_inputs_are_one_error_line(tmp_path, capsys, argv, fragments):
    assert cli.main([*argv, "--out", str(tmp_path / "cmp")]) == 2
    one_error(capsys, *fragments)
    assert not (tmp_path / "cmp").exists()


def test_interrupted_compare_says_how_to_continue(tmp_path, capsys, monkeypatch):
    from fastabsld.study import compare as compare_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_module, "compare", interrupted)
    assert cli.main(["compare", "absld", "--out", str(tmp_path / "cmp")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run the same command again" in err[0] and str(tmp_path / "cmp") in err[0]
