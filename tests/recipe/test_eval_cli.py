"""``fastabsld eval`` that cannot mislead or destroy: run folders, outputs that would replace run files, data of
other classes, non-finite logits, class names on the plot, a full disk while plotting, the size of the split,
and the sanity warnings on a model that masks its gradients."""

import contextlib
import errno
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fastabsld.recipe import checkpoint, cli, predictions, report
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.data import load_digits
from fastabsld.recipe.runfiles import RUN_FILES
from tests.recipe.conftest import png_folder

QUICK = ["--epochs", "1", "--train-subset", "64", "--steps", "1", "--no-progress", "--eval-every", "1"]
NETS = '''
import torch


class Linear(torch.nn.Module):
    def __init__(self, num_classes, in_channels, scale):
        super().__init__()
        self.linear = torch.nn.Linear(64 * in_channels, num_classes)
        self.scale = scale

    def forward(self, x):
        return self.scale * self.linear(x.flatten(1))


def honest(num_classes, in_channels):
    return Linear(num_classes, in_channels, 1.0)


def masked(num_classes, in_channels):  # a saturated softmax: the cross-entropy's gradient is 0
    return Linear(num_classes, in_channels, 1e4)
'''


def one_error(capsys, *fragments):
    """The captured stderr is one line, 'error: ...', holding every fragment; returns it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 1-epoch PGD-AT digits run (the tests copy it before writing into it)."""
    root = tmp_path_factory.mktemp("eval")
    folder = root / "run"
    assert cli.main(["train", "--method", "pgd-at", *QUICK, "--run-dir", str(folder), "--test-attacks", "clean",
                     "--cache-dir", str(root / "cache")]) == 0
    return folder


@pytest.fixture
def own_run(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_a_run_folder_is_evaluated_through_its_best_pt(own_run, capsys):
    capsys.readouterr()
    assert cli.main(["eval", str(own_run), "--attacks", "clean", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"evaluating {own_run / 'best.pt'}" in out
    assert predictions.load(own_run / f"best_test_{predictions.FILE}").identity["checkpoint"] == \
        str(own_run / "best.pt")
    (own_run / "best.pt").unlink()  # then its last.pt
    assert cli.main(["eval", str(own_run), "--attacks", "clean", "--no-progress"]) == 0
    assert f"evaluating {own_run / 'last.pt'}" in capsys.readouterr().out
    empty = own_run / "empty"
    empty.mkdir()
    assert cli.main(["eval", str(empty), "--no-progress"]) == 2
    one_error(capsys, str(empty), "without best.pt or last.pt", "run folder or a checkpoint file")


def test_n_examples_larger_than_the_split_is_an_error(run, tmp_path, capsys):
    size = len(load_digits(0).test[1])
    capsys.readouterr()
    assert cli.main(["eval", str(run / "best.pt"), "--n-examples", "100000", "--attacks", "clean",
                     "--plot", str(tmp_path / "p.png"), "--predictions", str(tmp_path / "p.npz"), "--no-progress"]) == 2
    one_error(capsys, "--n-examples 100000", f"test split ({size} images)")
    assert not (tmp_path / "p.png").exists()
    assert cli.main(["eval", str(run / "best.pt"), "--n-examples", str(size), "--attacks", "clean",
                     "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0  # the whole split may be named
    assert json.loads((tmp_path / "e.json").read_text())["n_examples"] == size


@pytest.mark.parametrize("option, name", [
    ("--json", "best.pt"), ("--json", "last.pt"), ("--json", "metrics.json"), ("--plot", "curves.png"),
    ("--plot", "per_class.png"), ("--predictions", "predictions.npz"), ("--json", "train.log"),
    ("--json", "weights.bin"),  # a checkpoint under another name
    ("--plot", "other.pth"),
])
def test_outputs_never_replace_a_checkpoint_or_a_run_file(own_run, capsys, option, name):
    shutil.copy(own_run / "best.pt", own_run / "weights.bin")
    (own_run / "train.log").write_text("a line\n")
    before = files(own_run)
    capsys.readouterr()
    assert cli.main(["eval", str(own_run / "best.pt"), "--attacks", "clean", option, str(own_run / name),
                     "--no-progress"]) == 2
    one_error(capsys, option, name, "refusing to write over")
    assert files(own_run) == before


def test_outputs_must_differ(own_run, tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["eval", str(own_run / "best.pt"), "--attacks", "clean", "--json", str(tmp_path / "a.json"),
                     "--plot", str(tmp_path / "a.json"), "--no-progress"]) == 2
    one_error(capsys, "must name different files")
    assert not (tmp_path / "a.json").exists()


def test_every_run_file_name_is_protected():
    from fastabsld.recipe import lock
    from fastabsld.study import compare

    written = {report.METRICS_FILE, lock.LOCK_FILE, predictions.FILE, compare.COMPARE_FILE, compare.PLOT_FILE,
               compare.EXTRA_EVAL_FILE, compare.TEACHER_TEST_FILE, compare.LOG_FILE, "demo.json", "demo.png",
               "last.pt", "best.pt", checkpoint.previous_path("last.pt"),
               checkpoint.previous_path("best.pt"), "per_class.png", "curves.png", "temperatures.png",
               "temperature_accuracy.png"}
    assert written <= set(RUN_FILES)


def _folder_run(tmp_path, classes):
    images = tmp_path / "images"
    png_folder(images, per_class=12, size=(8, 8))
    run = tmp_path / "run"
    assert cli.main(["train", "--dataset", "folder", "--data-dir", str(images), "--method", "pgd-at", "--model",
                     "cnn-s", "--batch-size", "8", "--epochs", "1", "--steps", "1", "--test-attacks", "clean",
                     "--run-dir", str(run), "--no-progress"]) == 0
    other = tmp_path / "other"
    png_folder(other, per_class=12, size=(8, 8))
    for old, new in classes.items():
        if new is None:
            shutil.rmtree(other / old)
        else:
            shutil.copytree(other / old, other / new)
            if old != "cat":
                shutil.rmtree(other / old)
    return run, other


@pytest.mark.parametrize("classes, fragments", [
    ({"eel": "eft", "dog": "ant"}, ["3 classes (cat, dog, eel)", "3 classes (ant, cat, eft)"]),
    ({"cat": "yak"}, ["3 classes (cat, dog, eel)", "4 classes (cat, dog, eel, yak)"]),
    ({"eel": None}, ["3 classes (cat, dog, eel)", "2 classes (cat, dog)"]),
])
def test_data_of_other_classes_is_refused_naming_both(tmp_path, capsys, classes, fragments):
    run, other = _folder_run(tmp_path, classes)
    capsys.readouterr()
    assert cli.main(["eval", str(run / "best.pt"), "--data-dir", str(other), "--attacks", "clean",
                     "--no-progress"]) == 2
    one_error(capsys, str(run / "best.pt"), "was trained on", *fragments)
    assert not (run / "best_test_per_class.png").exists()


def test_the_plot_names_the_classes(tmp_path, monkeypatch):
    run, _ = _folder_run(tmp_path, {})
    seen = {}
    original = report.plot_per_class

    def plot(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(report, "plot_per_class", plot)
    assert cli.main(["eval", str(run / "best.pt"), "--attacks", "clean", "--no-progress"]) == 0
    assert tuple(seen["class_names"]) == ("cat", "dog", "eel")


def _model_checkpoint(path, model, state_dict):
    cfg = TrainConfig(method="pgd-at", model=model)
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": cfg.to_dict(), "model": state_dict,
                            "num_classes": 10, "in_channels": 1, "class_names": [str(k) for k in range(10)]}, path)
    return path


@pytest.fixture
def nets(tmp_path, monkeypatch):
    (tmp_path / "eval_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "eval_nets"


def test_nonfinite_logits_count_as_wrong_and_are_reported(tmp_path, nets, capsys):
    state = {"linear.weight": torch.full((10, 64), float("nan")), "linear.bias": torch.zeros(10)}
    path = _model_checkpoint(tmp_path / "nan.pt", f"{nets}:honest", state)
    capsys.readouterr()
    assert cli.main(["eval", str(path), "--attacks", "clean", "fgsm", "--json", str(tmp_path / "e.json"),
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    size = len(load_digits(0).test[1])
    assert "nonfinite" in out and "clean          0.0000" in out and f"{size:>9d}" in out
    results = json.loads((tmp_path / "e.json").read_text())["results"]
    assert results["clean"]["average"] == 0.0 and results["clean"]["nonfinite"] == size  # never "class 0"
    assert results["fgsm"]["nonfinite"] == size


@pytest.fixture
def linear_weights():
    """A logistic regression fitted to the digits training split."""
    x, y = load_digits(0).train
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 10)
    optimiser = torch.optim.SGD(linear.parameters(), lr=0.5)
    for _ in range(150):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(linear(x.flatten(1)), y).backward()
        optimiser.step()
    return {f"linear.{k}": v.detach() for k, v in linear.state_dict().items()}


def test_sanity_warnings_on_a_model_that_masks_its_gradients(tmp_path, nets, linear_weights, capsys):
    common = ["--attacks", "clean", "fgsm", "pgd10", "cw10", "--sanity", "--no-progress"]
    honest = _model_checkpoint(tmp_path / "honest.pt", f"{nets}:honest", linear_weights)
    masked = _model_checkpoint(tmp_path / "masked.pt", f"{nets}:masked", linear_weights)
    capsys.readouterr()
    assert cli.main(["eval", str(honest), *common, "--json", str(tmp_path / "honest.json")]) == 0
    assert "warning:" not in capsys.readouterr().out
    sanity = json.loads((tmp_path / "honest.json").read_text())["sanity"]
    assert sanity["warnings"] == [] and sanity["unbounded"]["average"] < 0.1
    assert cli.main(["eval", str(masked), *common, "--json", str(tmp_path / "masked.json")]) == 0
    out = capsys.readouterr().out
    table_end = out.index("cw10")
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings and all(out.index(line) > table_end for line in warnings)  # under the table
    written = json.loads((tmp_path / "masked.json").read_text())
    assert {w["check"] for w in written["sanity"]["warnings"]} == {"masking", "unbounded"}
    assert all(w["p_value"] < 0.05 for w in written["sanity"]["warnings"])
    results = written["results"]
    assert results["pgd10"]["average"] > results["cw10"]["average"] + 0.02


def _full_disk_in_pil(monkeypatch):
    """PIL's PNG writer failing as on a full disk: the file was created, its bytes never reached the disk."""
    from PIL import Image

    def full(self, fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)):
            open(fp, "wb").close()  # the buffered write fails at close, after PIL's own clean-up
        else:
            fp.write(b"\x89PNG\r\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)


def test_a_full_disk_while_plotting_leaves_no_png(run, tmp_path, capsys, monkeypatch):
    _full_disk_in_pil(monkeypatch)
    plot = tmp_path / "p.png"
    capsys.readouterr()
    assert cli.main(["eval", str(run / "best.pt"), "--attacks", "clean", "--plot", str(plot), "--predictions",
                     str(tmp_path / "p.npz"), "--no-progress"]) == 2
    one_error(capsys, f"cannot write {plot}: No space left on device")
    assert not plot.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    np.testing.assert_array_equal(predictions.load(tmp_path / "p.npz").indices, np.arange(720))


@pytest.fixture
def full_disk(tmp_path):
    """A 16 KiB tmpfs filled up (needs the right to mount: root; skipped otherwise)."""
    folder = tmp_path / "full"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        with open(folder / "filler", "wb", buffering=0) as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"x" * 512)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_really_full_disk_leaves_no_png(run, full_disk, tmp_path, capsys):
    plot = full_disk / "p.png"
    capsys.readouterr()
    assert cli.main(["eval", str(run / "best.pt"), "--attacks", "clean", "--plot", str(plot), "--predictions",
                     str(tmp_path / "p.npz"), "--no-progress"]) == 2
    one_error(capsys, f"cannot write {plot}: No space left on device")
    assert sorted(os.listdir(full_disk)) == ["filler"]
