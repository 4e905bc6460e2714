"""The command line: options generated from TrainConfig, config files, train/eval round trips (digits, an image folder,
a model factory, a TRADES teacher), resume rules, and every bad input as one error line with exit status 2."""

import dataclasses
import json
import os
import sys

import pytest
import torch

from fastabsld.recipe import cli, lock
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.models import build_model
from fastabsld.recipe.options import field_docs, flag, parse_number
from tests.recipe.conftest import png_folder
from tests.recipe.test_teachers import trades_model

QUICK = ["--epochs", "1", "--train-subset", "64", "--steps", "1", "--no-progress", "--eval-every", "1"]


def one_error(capsys, *fragments):
    """The captured stderr is exactly one line, 'error: ...', containing every fragment; returns it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(folder):
    """The run files of a folder and their bytes (the lock file, which any run attempt leaves, is not one)."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))
            if (folder / name).is_file() and name != lock.LOCK_FILE}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 1-epoch PGD-AT run on digits (module-wide, read-only for the tests)."""
    root = tmp_path_factory.mktemp("cli")
    run = root / "run"
    assert cli.main(["train", "--method", "pgd-at", *QUICK, "--run-dir", str(run), "--test-attacks", "clean", "pgd2",
                     "--cache-dir", str(root / "cache")]) == 0
    return run


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"]])
def test_help(argv, capsys):
    assert cli.main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: fastabsld" in out
    if argv[0] == "train":
        assert "17 grey levels" in out and "--resume" in out and "--config FILE" in out
        assert "--teacher-lr" in out and "--tau-min" in out and "(default: 0.9)" in out
        assert "--reweight" in out and "--teacher-method" in out and "--ard-temperature" in out


def test_method_settings_reach_the_config():
    args = cli.build_parser().parse_args(["train", "--method", "iad", "--reweight", "--iad-warmup", "1/2",
                                          "--reweight-max", "3", "--teacher-method", "trades", "--trades-beta", "2"])
    cfg = cli.train_config(args)
    assert (cfg.method, cfg.reweight, cfg.iad_warmup, cfg.reweight_max) == ("iad", True, 0.5, 3.0)
    assert (cfg.teacher_method, cfg.trades_beta, cfg.ard_temperature) == ("trades", 2.0, 30.0)
    with pytest.raises(ValueError, match="distils from no teacher"):
        cli.train_config(cli.build_parser().parse_args(["train", "--method", "trades", "--reweight"]))


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fastabsld 0.1.0") and torch.__version__ in out


def test_every_config_field_is_a_flag_with_its_type_default_choices_and_doc():
    train = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    actions = {a.dest: a for a in train._actions}
    for f in dataclasses.fields(TrainConfig):
        action = actions[f.name]
        assert flag(f.name) in action.option_strings
        assert field_docs()[f.name].replace("%", "%%")[:40] in action.help
        if f.default is not None and f.default is not dataclasses.MISSING and not isinstance(f.default, bool):
            assert "(default: " in action.help, f.name
        if f.metadata.get("choices"):
            assert tuple(action.choices) == f.metadata["choices"]
    # The defaults of the flags are the dataclass's: nothing given, nothing changed.
    assert cli.train_config(cli.build_parser().parse_args(["train"])) == TrainConfig()


def test_flags_reach_the_config_and_numbers_take_fractions():
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--method", "rslad", "--eps", "8/255", "--alpha", "2/255", "--momentum", "0.8",
                              "--weight-decay", "5e-4", "--milestones", "0.5", "0.75", "--lr-gamma", "0.2",
                              "--tau-min", "0.25", "--adv-weight", "0.7", "--val-attacks", "clean", "pgd10",
                              "--select-metric", "pgd10.worst", "--teacher-seed", "3", "--amp", "--no-fold-bn",
                              "--no-progress", "--augment"])
    cfg = cli.train_config(args)
    assert cfg.eps == pytest.approx(8 / 255) and cfg.alpha == pytest.approx(2 / 255)
    assert (cfg.method, cfg.momentum, cfg.weight_decay, cfg.milestones, cfg.lr_gamma, cfg.tau_min, cfg.adv_weight) == \
        ("rslad", 0.8, 5e-4, (0.5, 0.75), 0.2, 0.25, 0.7)
    assert (cfg.val_attacks, cfg.select_metric, cfg.teacher_seed, cfg.amp, cfg.fold_bn, cfg.progress, cfg.augment) == \
        (("clean", "pgd10"), "pgd10.worst", 3, True, False, False, True)
    assert parse_number("1/4") == 0.25 and parse_number(" 3 ") == 3.0


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_config_file_then_flags(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"method": "rslad", "eps": "8/255", "beta": 0.3, "milestones": [0.5],
                                    "teacher-epochs": 3}))
    else:
        path.write_text('method = "rslad"\neps = "8/255"\nbeta = 0.3\nmilestones = [0.5]\nteacher-epochs = 3\n')
    cfg = cli.train_config(cli.build_parser().parse_args(["train", "--config", str(path), "--beta", "0.05"]))
    assert (cfg.method, cfg.beta, cfg.milestones, cfg.teacher_epochs) == ("rslad", 0.05, (0.5,), 3)
    assert cfg.eps == pytest.approx(8 / 255)


@pytest.mark.parametrize("content, fragments", [
    ('{"method": "absld", "betta": 0.2}', ["unknown setting 'betta'"]),
    ('{"eps": "eight"}', ["eps", "fraction"]),
    ('{"epochs": 2.5}', ["epochs must be int"]),
    ('{"method": "absld",', ["not valid JSON"]),
    ('[1, 2]', ["table of settings"]),
])
def test_bad_config_files_are_one_error_line(tmp_path, capsys, content, fragments):
    path = tmp_path / "bad.json"
    path.write_text(content)
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(path), "--run-dir", str(run)]) == 2
    one_error(capsys, str(path) if "table" in fragments[0] or "JSON" in fragments[0] or "unknown" in fragments[0]
              else "", *fragments)
    assert not run.exists()
    (tmp_path / "bad.toml").write_text("method = \n")
    assert cli.main(["train", "--config", str(tmp_path / "bad.toml")]) == 2
    one_error(capsys, "not valid TOML")


def test_train_eval_round_trip(finished_run, tmp_path, capsys):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 1 and metrics["class_names"] == [str(k) for k in range(10)]
    out_json = tmp_path / "eval.json"
    assert cli.main(["eval", str(finished_run / "best.pt"), "--attacks", "clean", "fgsm", "pgd", "--steps", "3",
                     "--split", "val", "--n-examples", "50", "--seed", "2", "--json", str(out_json),
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pgd3" in out and "(50 images)" in out
    evaluation = json.loads(out_json.read_text())
    assert evaluation["split"] == "val" and list(evaluation["results"]) == ["clean", "fgsm", "pgd3"]
    assert evaluation["n_examples"] == 50 and sum(evaluation["class_counts"]) == 50
    assert max(evaluation["class_counts"]) - min(evaluation["class_counts"]) <= 1  # stratified
    assert evaluation["class_names"] == [str(k) for k in range(10)]
    assert evaluation["versions"]["torch"] == torch.__version__ and evaluation["time"].endswith("+00:00")
    assert (tmp_path / "eval_per_class.png").stat().st_size > 0
    # The same checkpoint, attacks in another company: the same PGD figure.
    assert cli.main(["eval", str(finished_run / "best.pt"), "--attacks", "pgd3", "--split", "val", "--n-examples",
                     "50", "--seed", "2", "--json", str(tmp_path / "alone.json"), "--no-progress"]) == 0
    alone = json.loads((tmp_path / "alone.json").read_text())["results"]["pgd3"]
    assert alone == evaluation["results"]["pgd3"]


def test_refuses_to_overwrite_and_resume_rules(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "best.pt", "metrics.json"):
        (run / name).write_bytes((finished_run / name).read_bytes())
    before = snapshot(run)
    common = ["--run-dir", str(run), "--cache-dir", str(tmp_path / "cache")]
    capsys.readouterr()
    assert cli.main(["train", "--method", "pgd-at", *QUICK, *common]) == 2
    one_error(capsys, "holds a run already", "--resume")
    assert cli.main(["train", *common, "--resume", "--beta", "0.5", "--lr", "0.2"]) == 2
    one_error(capsys, "--beta 0.1 -> 0.5", "--lr 0.1 -> 0.2", "another --run-dir")
    assert snapshot(run) == before
    # What a resume may change is applied, and said.
    assert cli.main(["train", *common, "--resume", "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "changed settings: --epochs 1 -> 2" in out and "milestones are rescaled" in out
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 2


@pytest.mark.parametrize("which", ["last.pt", "best.pt"])
@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "text", "wrong_keys", "bad_config"])
def test_a_damaged_checkpoint_is_one_error_and_the_run_folder_is_kept(finished_run, tmp_path, capsys, which, damage):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "best.pt", "metrics.json"):
        (run / name).write_bytes((finished_run / name).read_bytes())
    original = (run / which).read_bytes()
    content = {"truncated": original[:len(original) // 2], "empty": b"", "random": os.urandom(4096),
               "text": b"checkpoint\n"}.get(damage)
    if damage == "wrong_keys":
        torch.save({"weights": torch.zeros(2)}, run / which)
    elif damage == "bad_config":
        state = torch.load(run / which, weights_only=False)
        state["config"]["epochs"] = "many"
        torch.save(state, run / which)
    else:
        (run / which).write_bytes(content)
    before = snapshot(run)
    capsys.readouterr()
    assert cli.main(["train", "--run-dir", str(run), "--resume", "--no-progress"]) == 2
    one_error(capsys, str(run / which))
    assert snapshot(run) == before
    assert cli.main(["eval", str(run / which), "--no-progress"]) == 2
    one_error(capsys, str(run / which))


@pytest.mark.parametrize("change, fragment", [
    ("weights", "holds weights that do not fit the model 'cnn-s'"),
    ("model", "names a model that cannot be rebuilt"),
])
def test_a_checkpoint_whose_model_cannot_be_rebuilt_is_one_error(finished_run, tmp_path, capsys, change, fragment):
    state = torch.load(finished_run / "best.pt", weights_only=False)
    if change == "weights":
        state["model"] = build_model("cnn-l", 10, 1).state_dict()
    else:
        state["config"]["model"] = "no_such_module:net"  # a factory that was importable where it trained
    torch.save(state, tmp_path / "best.pt")
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "best.pt"), "--attacks", "clean", "--no-progress"]) == 2
    one_error(capsys, str(tmp_path / "best.pt"), fragment)


def _teacher_files(tmp_path):
    torch.manual_seed(0)
    good = build_model("cnn-l", 10, 1).state_dict()
    (tmp_path / "text.pt").write_text("not weights\n")
    torch.save(build_model("cnn-l", 10, 1), tmp_path / "module.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in good.items()}}, tmp_path / "wrapped.pt")
    torch.save({"state_dict": {"fc.weight": torch.zeros(10, 3)}}, tmp_path / "wrapped_wrong.pt")
    torch.save(good, tmp_path / "cnn_l.pt")


@pytest.mark.parametrize("name, extra, fragments", [
    ("text.pt", [], ["not a PyTorch weights file"]),
    ("module.pt", [], ["pickled object", "state_dict()"]),
    ("wrapped_wrong.pt", [], ["do not fit the architecture"]),
    ("cnn_l.pt", ["--teacher-model", "cnn-s"], ["do not fit the architecture", "(cnn-s)", "shape mismatch"]),
    ("missing.pt", [], ["no such file"]),
    (".", [], ["is a folder, not a weights file"]),
])
def test_unusable_teachers_are_one_error_line(tmp_path, capsys, name, extra, fragments):
    _teacher_files(tmp_path)
    run = tmp_path / "run"
    assert cli.main(["train", "--teacher-path", str(tmp_path / name), *extra, *QUICK, "--run-dir", str(run)]) == 2
    one_error(capsys, *fragments)
    assert not (run / "last.pt").exists()


def test_a_wrapped_state_dict_teacher_is_used_and_recorded(tmp_path, capsys):
    _teacher_files(tmp_path)
    run = tmp_path / "run"
    assert cli.main(["train", "--method", "rslad", "--teacher-path", str(tmp_path / "wrapped.pt"), *QUICK,
                     "--run-dir", str(run), "--test-attacks", "clean"]) == 0
    teacher = json.loads((run / "metrics.json").read_text())["teacher"]
    assert (teacher["source"], teacher["format"], teacher["architecture"]) == ("file", "state_dict", "cnn-l")
    assert teacher["path"] == str(tmp_path / "wrapped.pt") and set(teacher["val"]) == {"clean", "pgd20"}


@pytest.mark.parametrize("argv, fragments", [
    (["eval", "CKPT", "--attacks", "fgsm", "--eps", "-1"], ["eps must be non-negative"]),
    (["eval", "CKPT", "--attacks", "pgd20", "--eps", "nan"], ["eps must be"]),
    (["eval", "CKPT", "--attacks", "pgd20", "--alpha", "-0.5"], ["alpha must be non-negative"]),
    (["eval", "CKPT", "--attacks", "clean", "clean"], ["must not repeat"]),
    (["eval", "CKPT", "--attacks", "pgd20", "--steps", "5"], ["runs 20 steps, but steps=5"]),
    (["eval", "CKPT", "--attacks", "deepfool"], ["unknown attack 'deepfool'"]),
    (["eval", "CKPT", "--threads", "-3"], ["--threads", "must be an integer >= 1"]),
    (["eval", "CKPT", "--eps", "8/0"], ["--eps", "fraction"]),
    (["eval", "CKPT", "--device", "cuda"], ["CUDA is not available"]),
    (["eval", "CKPT", "--device", "tpu"], ["device must be"]),
    (["train", "--device", "cuda", "--run-dir", "RUN"], ["CUDA is not available"]),
    (["train", "--threads", "-3"], ["--threads"]),
    (["train", "--eps", "-1", "--run-dir", "RUN"], ["eps must be"]),
    (["train", "--alpha", "nan", "--run-dir", "RUN"], ["alpha must be"]),
    (["train", "--test-attacks", "pgd0", "--run-dir", "RUN"], ["test_attacks"]),
    (["train", "--method", "dagger"], ["--method", "invalid choice"]),
    (["train", "--method", "trades", "--reweight"], ["reweight re-weights a distillation loss"]),
    (["train", "--epoch", "3"], ["unrecognized arguments: --epoch"]),
    (["train", "--dataset", "folder", "--data-dir", "EMPTY", "--run-dir", "RUN"], ["holds no images"]),
    (["train", "--dataset", "cifar10", "--data-dir", "EMPTY", "--run-dir", "RUN"], ["cifar-10-batches-py",
                                                                                   "cifar-10-python.tar.gz"]),
    (["train", "--model", "no_such_module:net", *QUICK, "--run-dir", "RUN"], ["cannot import no_such_module"]),
    (["train", "--model", "resnet81", "--run-dir", "RUN"], ["model must be one of", "resnet81"]),
])
def test_bad_inputs_are_one_error_line(finished_run, tmp_path, capsys, monkeypatch, argv, fragments):
    if "cifar10" in argv:  # offline: no download either
        monkeypatch.setitem(sys.modules, "torchvision", None)
    (tmp_path / "empty").mkdir()
    values = {"CKPT": str(finished_run / "best.pt"), "RUN": str(tmp_path / "run"), "EMPTY": str(tmp_path / "empty")}
    argv = [values.get(word, word) for word in argv]
    before = snapshot(finished_run)
    capsys.readouterr()
    assert cli.main(argv) == 2
    one_error(capsys, *fragments)
    assert not (tmp_path / "run").exists() and snapshot(finished_run) == before


def test_interrupt_prints_the_resume_command(tmp_path, capsys, monkeypatch):
    from fastabsld.recipe import train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    run = tmp_path / "run"
    assert cli.main(["train", "--method", "pgd-at", "--epochs", "3", "--run-dir", str(run), "--no-progress"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted")
    assert err[0].endswith(f"train --method pgd-at --epochs 3 --run-dir {run} --no-progress --resume")
    assert cli.main(["train", "--method", "pgd-at", "--no-progress", "--resume"]) == 130
    assert "--run-dir runs/pgd-at-digits-cnn-s-seed0 --resume" in capsys.readouterr().err


def test_train_on_an_image_folder_then_eval(tmp_path, capsys):
    png_folder(tmp_path / "images", per_class=12, size=(8, 8))
    run = tmp_path / "run"
    assert cli.main(["train", "--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--method", "pgd-at",
                     "--model", "cnn-s", "--batch-size", "8", "--epochs", "1", "--steps", "1", "--eps", "8/255",
                     "--test-attacks", "clean", "pgd2", "--run-dir", str(run), "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == ["cat", "dog", "eel"] and metrics["test"]["clean"]["count"] == 7
    assert len(metrics["test"]["clean"]["per_class"]) == 3
    capsys.readouterr()
    assert cli.main(["eval", str(run / "best.pt"), "--attacks", "clean", "pgd2", "--json", str(tmp_path / "e.json"),
                     "--no-progress"]) == 0
    evaluation = json.loads((tmp_path / "e.json").read_text())
    assert evaluation["class_names"] == ["cat", "dog", "eel"] and sum(evaluation["class_counts"]) == 7


FACTORY = '''
import torch


def tiny(num_classes, in_channels):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))


def not_a_model(num_classes):
    return 3
'''


def test_model_factory_from_the_command_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    assert cli.main(["train", "--method", "pgd-at", "--model", "my_nets:tiny", *QUICK, "--test-attacks", "clean",
                     "--run-dir", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["config"]["model"] == "my_nets:tiny"
    assert cli.main(["eval", str(run / "best.pt"), "--attacks", "clean", "--no-progress"]) == 0
    assert (run / "best_test_per_class.png").stat().st_size > 0  # without --json: beside the checkpoint
    capsys.readouterr()
    assert cli.main(["train", "--method", "pgd-at", "--model", "my_nets:not_a_model", *QUICK,
                     "--run-dir", str(tmp_path / "r2")]) == 2
    one_error(capsys, "returned int, not an nn.Module")


def test_a_trades_teacher_through_teacher_path(tmp_path, capsys):
    """A TRADES-layout WRN state_dict (DataParallel prefix, under 'state_dict') distils a student through the CLI."""
    png_folder(tmp_path / "images", per_class=6, size=(32, 32))
    reference = trades_model(10, 1, num_classes=3)
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}},
               tmp_path / "model_cifar_wrn.pt")
    run = tmp_path / "run"
    assert cli.main(["train", "--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--method", "absld",
                     "--model", "cnn-s", "--teacher-path", str(tmp_path / "model_cifar_wrn.pt"), "--batch-size", "6",
                     "--epochs", "1", "--steps", "1", "--test-attacks", "clean", "--run-dir", str(run),
                     "--no-progress"]) == 0
    teacher = json.loads((run / "metrics.json").read_text())["teacher"]
    assert (teacher["format"], teacher["architecture"]) == ("trades-wideresnet", "wrn-10-1")
    # Its recorded validation accuracy is the TRADES model's own on the validation images.
    from fastabsld.recipe.data import load_folder

    x, y = load_folder(str(tmp_path / "images")).val
    with torch.no_grad():
        expected = (reference(x).argmax(1) == y).double().mean().item()
    assert teacher["val"]["clean"]["average"] == pytest.approx(expected)
