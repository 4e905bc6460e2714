"""Per-example results: evaluate() keeps them, predictions.npz stores and checks them, train / eval / compare
write them with the split's identity, and every figure of the table follows from the file alone."""

import json
import re
import zipfile

import numpy as np
import pytest
import torch

from fastabsld.evaluation import evaluate
from fastabsld.metrics import nsd
from fastabsld.recipe import cli, predictions
from fastabsld.recipe.data import load_digits

CLASSES = 4
QUICK = ["--epochs", "1", "--train-subset", "64", "--steps", "1", "--no-progress", "--eval-every", "1"]


def tiny(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, CLASSES))
    x = torch.rand(30, 3, 2, 2, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(30) % CLASSES
    return model, list(zip(x.split(8), y.split(8))), y


def identity(**changes):
    return {"dataset": "toy", "split": "test", "split_seed": 0, "split_size": 30, "class_names": None,
            "num_classes": CLASSES, "eps": 0.1, "alpha": 0.05, "threat_model": "Linf", "checkpoint": "toy.pt",
            "seed": 0, **changes}


@pytest.fixture(scope="module")
def toy_evaluation():
    model, loader, _ = tiny()
    return evaluate(model, loader, ("clean", "fgsm", "pgd2"), eps=0.1, alpha=0.05, progress=False)


def per_class_from(labels, correct):
    return [correct[labels == k].mean() for k in range(CLASSES)]


def test_evaluate_keeps_each_examples_prediction(toy_evaluation):
    model, loader, y = tiny()
    assert np.array_equal(toy_evaluation.labels, y.numpy())
    with torch.no_grad():
        clean = torch.cat([model(x).argmax(1) for x, _ in loader]).numpy()
    assert np.array_equal(toy_evaluation.predictions["clean"], clean)
    for attack, figures in toy_evaluation.items():
        correct = toy_evaluation.correct(attack)
        assert figures["average"] == pytest.approx(correct.mean())
        assert figures["per_class"] == pytest.approx(per_class_from(toy_evaluation.labels, correct))
        assert figures["nonfinite"] == 0
    json.dumps(toy_evaluation, allow_nan=False)  # still a plain dict of figures


def test_round_trip_recomputes_the_table(tmp_path, toy_evaluation):
    path = predictions.save(tmp_path / predictions.FILE, toy_evaluation, identity())
    loaded = predictions.load(path)
    assert loaded.attacks == ("clean", "fgsm", "pgd2")
    assert np.array_equal(loaded.indices, np.arange(30)) and np.array_equal(loaded.labels, toy_evaluation.labels)
    for attack, figures in toy_evaluation.items():
        assert loaded.predicted[attack].dtype == np.int16
        assert np.array_equal(loaded.predicted[attack], toy_evaluation.predictions[attack])
        per_class = per_class_from(loaded.labels, loaded.correct[attack])
        assert per_class == pytest.approx(figures["per_class"])
        assert min(per_class) == pytest.approx(figures["worst"])
        assert float(nsd(torch.tensor(per_class, dtype=torch.float64))) == pytest.approx(figures["nsd"])
    assert loaded.identity["split_hash"] == predictions.split_hash(loaded.labels, loaded.indices)
    assert loaded.identity["num_examples"] == 30 and loaded.identity["eps"] == 0.1
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left beside it


def test_nonfinite_logits_are_wrong_and_counted(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(len(x), CLASSES)
            logits[:, 0] = 1.0  # a finite row predicts class 0
            logits[::3, 1] = float("nan")
            logits[1::3, 2] = float("inf")
            return logits

    y = torch.zeros(9, dtype=torch.int64)  # class 0: argmax of a NaN row would count as right
    results = evaluate(Broken(), [(torch.rand(9, 1), y)], ("clean",), progress=False)
    assert results["clean"]["nonfinite"] == 6 and results["clean"]["average"] == pytest.approx(3 / 9)
    assert (results.predictions["clean"] == -1).sum() == 6
    loaded = predictions.load(predictions.save(tmp_path / "p.npz", results, identity(num_classes=CLASSES)))
    assert np.array_equal(loaded.predicted["clean"], results.predictions["clean"])
    assert loaded.correct["clean"].sum() == 3


def _rewrite(path, **changes):
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays.update(changes)
    np.savez(path, **arrays)


@pytest.mark.parametrize("change, fragment", [
    (lambda a: {"labels": np.roll(a["labels"], 1)}, "split hash"),
    (lambda a: {"correct/fgsm": ~a["correct/fgsm"]}, "disagree"),
    (lambda a: {"predicted/clean": a["predicted/clean"] + CLASSES}, "outside [-1, 4)"),
    (lambda a: {"format": np.array(99)}, "format 99"),
    (lambda a: {"predicted/pgd2": a["predicted/pgd2"][:5]}, "wrong shape"),
])
def test_reader_refuses_inconsistent_files(tmp_path, toy_evaluation, change, fragment):
    path = predictions.save(tmp_path / "p.npz", toy_evaluation, identity())
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    _rewrite(path, **change(arrays))
    with pytest.raises(ValueError, match=re.escape(fragment)):
        predictions.load(path)


def test_reader_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        predictions.load(tmp_path / "none.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a readable predictions file"):
        predictions.load(tmp_path / "text.npz")
    np.save(tmp_path / "one.npy", np.arange(3))
    with pytest.raises(ValueError, match="single numpy array"):
        predictions.load(tmp_path / "one.npy")
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    with pytest.raises(ValueError, match="lacks 'format'"):
        predictions.load(tmp_path / "other.npz")
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as archive:
        for name in ("format", "identity", "labels", "indices"):
            archive.writestr(f"{name}.npy", b"garbage")
    with pytest.raises(ValueError, match="not a readable predictions file"):
        predictions.load(tmp_path / "bad.npz")


def test_saving_checks_identity_and_indices(tmp_path, toy_evaluation):
    with pytest.raises(ValueError, match="lacks eps"):
        predictions.save(tmp_path / "p.npz", toy_evaluation, {k: v for k, v in identity().items() if k != "eps"})
    with pytest.raises(ValueError, match="one entry per example"):
        predictions.save(tmp_path / "p.npz", toy_evaluation, identity(), indices=np.arange(5))
    assert not (tmp_path / "p.npz").exists()


def test_keep_existing_adds_attacks_of_the_same_examples_only(tmp_path, toy_evaluation):
    model, loader, _ = tiny()
    more = evaluate(model, loader, ("clean", "cw2"), eps=0.1, alpha=0.05, progress=False)
    path = tmp_path / "p.npz"
    predictions.save(path, toy_evaluation, identity())
    predictions.save(path, more, identity(), keep_existing=True)
    assert predictions.load(path).attacks == ("fgsm", "pgd2", "clean", "cw2")
    predictions.save(path, more, identity(eps=0.2), keep_existing=True)  # another threat model: replaced
    assert predictions.load(path).attacks == ("clean", "cw2")


def test_check_same_examples(tmp_path, toy_evaluation):
    first = predictions.load(predictions.save(tmp_path / "a.npz", toy_evaluation, identity()))
    same = predictions.load(predictions.save(tmp_path / "b.npz", toy_evaluation, identity(checkpoint="other.pt")))
    predictions.check_same_examples(first, same)
    other = predictions.load(predictions.save(tmp_path / "c.npz", toy_evaluation, identity(),
                                              indices=np.arange(30) + 1))
    with pytest.raises(ValueError, match="split_hash"):
        predictions.check_same_examples(first, other)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 1-epoch PGD-AT digits run (read-only for the tests)."""
    root = tmp_path_factory.mktemp("run")
    folder = root / "run"
    assert cli.main(["train", "--method", "pgd-at", *QUICK, "--run-dir", str(folder), "--test-attacks", "clean",
                     "pgd2", "--cache-dir", str(root / "cache")]) == 0
    return folder


def test_train_writes_the_test_predictions(run):
    loaded = predictions.load(run / predictions.FILE)
    metrics = json.loads((run / "metrics.json").read_text())
    test = load_digits(0).test
    assert np.array_equal(loaded.labels, test[1].numpy()) and np.array_equal(loaded.indices, np.arange(len(test[1])))
    assert loaded.attacks == ("clean", "pgd2")
    for attack in loaded.attacks:
        assert loaded.correct[attack].mean() == pytest.approx(metrics["test"][attack]["average"])
    assert loaded.identity["checkpoint"] == "best.pt" and loaded.identity["dataset"] == "digits"
    assert loaded.identity["split"] == "test" and loaded.identity["split_size"] == len(test[1])
    assert loaded.identity["class_names"] == [str(k) for k in range(10)]
    assert loaded.identity["eps"] == metrics["config"]["eps"]


def test_eval_writes_predictions_beside_the_json(run, tmp_path):
    out = tmp_path / "e.json"
    assert cli.main(["eval", str(run / "best.pt"), "--attacks", "clean", "pgd2", "--n-examples", "50", "--seed", "3",
                     "--json", str(out), "--no-progress"]) == 0
    written = json.loads(out.read_text())
    loaded = predictions.load(written["predictions"])
    assert written["predictions"] == str(tmp_path / "e_predictions.npz")
    test = load_digits(0).test
    assert len(loaded.indices) == 50 and np.all(np.diff(loaded.indices) > 0)
    assert np.array_equal(loaded.labels, test[1].numpy()[loaded.indices])  # the positions name the examples
    assert loaded.identity["split_size"] == len(test[1]) and loaded.identity["seed"] == 3
    for attack in ("clean", "pgd2"):
        assert loaded.correct[attack].mean() == pytest.approx(written["results"][attack]["average"])
    # Without --json: beside the checkpoint; --predictions chooses.
    assert cli.main(["eval", str(run / "best.pt"), "--attacks", "clean", "--split", "val", "--predictions",
                     str(tmp_path / "mine.npz"), "--plot", str(tmp_path / "mine.png"), "--no-progress"]) == 0
    assert predictions.load(tmp_path / "mine.npz").identity["split"] == "val"
