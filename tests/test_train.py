"""Data splits, models, the schedule and short end-to-end training runs on digits."""

import dataclasses
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastabsld import train as train_mod
from fastabsld.data import (CIFAR_FOLDERS, DIGITS_SPLIT, TensorLoader, crop_flip, load_cifar, load_dataset, load_digits,
                            stratified_split)
from fastabsld.models import MODELS, build_model
from fastabsld.train import TrainConfig, beta_at, config_hash, get_teacher, milestone_epochs, teacher_config, train
from tests.train_helpers import one_thread  # noqa: F401  (autouse fixture)


# ---------------------------------------------------------------- data

def test_digits_split_sizes_disjoint_and_stratified():
    from sklearn.datasets import load_digits as sk_digits

    data = load_digits(seed=0)
    sk = sk_digits()
    assert data.num_classes == 10 and data.in_channels == 1
    parts = {"train": data.train, "val": data.val, "test": data.test}
    for name, (x, y) in parts.items():
        assert x.shape == (DIGITS_SPLIT[name], 1, 8, 8) and y.shape == (DIGITS_SPLIT[name],)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert sum(DIGITS_SPLIT.values()) == len(sk.target)
    # Every image appears exactly once across the splits (compare the raw pixels as rows).
    all_x = torch.cat([x.reshape(len(x), -1) for x, _ in parts.values()]) * 16
    ref = torch.from_numpy(sk.data.astype(np.float32))
    assert sorted(map(tuple, all_x.round().int().tolist())) == sorted(map(tuple, ref.int().tolist()))
    # Stratified: each class's share of each split is within one image of its share of the whole.
    whole = np.bincount(sk.target, minlength=10)
    for name, (_, y) in parts.items():
        counts = np.bincount(y.numpy(), minlength=10)
        ideal = whole * DIGITS_SPLIT[name] / len(sk.target)
        assert np.all(np.abs(counts - ideal) <= 1), (name, counts, ideal)


def test_digits_split_seeded():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(a.test[0], b.test[0]) and torch.equal(a.train[1], b.train[1])
    assert not torch.equal(a.test[0], c.test[0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=3, max_size=200), st.data())
def test_stratified_split_partitions(labels, draw):
    n = len(labels)
    first = draw.draw(st.integers(0, n))
    second = draw.draw(st.integers(0, n - first))
    sizes = [first, second, n - first - second]
    parts = stratified_split(labels, sizes, seed=draw.draw(st.integers(0, 5)))
    assert [len(p) for p in parts] == sizes
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    labels = np.asarray(labels)
    for part, size in zip(parts, sizes):
        for c in np.unique(labels):
            ideal = (labels == c).sum() * size / n
            assert abs((labels[part] == c).sum() - ideal) < 2


def test_stratified_split_bad_sizes():
    with pytest.raises(ValueError, match="sizes"):
        stratified_split([0, 1, 1], [1, 1], 0)


def test_tensor_loader_covers_and_replays():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    loader = TensorLoader(x, y, 4, shuffle=True, seed=3)
    assert len(loader) == 3
    state = loader.generator.get_state()
    first = [b[1].tolist() for b in loader]
    assert sorted(sum(first, [])) == list(range(10)) and [len(b) for b in first] == [4, 4, 2]
    second = [b[1].tolist() for b in loader]
    assert first != second
    loader.generator.set_state(state)
    assert [b[1].tolist() for b in loader] == first
    assert len(TensorLoader(x, y, 4, drop_last=True)) == 2
    with pytest.raises(ValueError):
        TensorLoader(x, y[:3], 4)


def test_crop_flip_against_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 6, 5, generator=gen)
    out = crop_flip(x, torch.Generator().manual_seed(1), padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        candidates = [padded[i, :, dy:dy + 6, dx:dx + 5] for dy in range(5) for dx in range(5)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)
    flipped = crop_flip(x, torch.Generator().manual_seed(2), padding=0)
    assert all(torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1)) for i in range(len(x)))
    assert any(torch.equal(flipped[i], x[i].flip(-1)) for i in range(len(x)))


# ---------------------------------------------------------------- models

@pytest.mark.parametrize("name,in_channels,size", [("cnn-s", 1, 8), ("cnn-l", 1, 8), ("resnet18", 3, 32),
                                                   ("mobilenetv2", 3, 32), ("wrn-34-10", 3, 32)])
def test_models_forward(name, in_channels, size):
    model = build_model(name, 7, in_channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_model_sizes_and_bad_name():
    def count(name):
        return sum(p.numel() for p in build_model(name, 10, 3).parameters())

    # Standard sizes: ResNet-18 ~11.2M, MobileNetV2 ~2.2M, WRN-34-10 ~46.2M parameters.
    assert 11.0e6 < count("resnet18") < 11.3e6
    assert 2.2e6 < count("mobilenetv2") < 2.4e6
    assert 46.0e6 < count("wrn-34-10") < 46.3e6
    assert count("cnn-s") < count("cnn-l")
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vgg", 10, 3)
    assert set(MODELS) == {"cnn-s", "cnn-l", "resnet18", "mobilenetv2", "wrn-34-10"}


# ---------------------------------------------------------------- schedule and config

def test_milestones_mirror_released_schedule():
    cfg = TrainConfig(epochs=300)
    assert milestone_epochs(cfg) == [215, 260, 285]
    assert beta_at(cfg, 214) == pytest.approx(0.1) and beta_at(cfg, 215) == pytest.approx(0.01)
    assert beta_at(cfg, 299) == pytest.approx(1e-4)
    # beta follows the LR of torch's MultiStepLR epoch by epoch.
    cfg = TrainConfig(epochs=20)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestone_epochs(cfg), cfg.lr_gamma)
    for epoch in range(cfg.epochs):
        assert opt.param_groups[0]["lr"] / cfg.lr == pytest.approx(beta_at(cfg, epoch) / cfg.beta)
        opt.step()
        sched.step()


def test_config_validation_and_defaults():
    cfg = TrainConfig()
    assert (cfg.model, cfg.teacher_model, cfg.eps) == ("cnn-s", "cnn-l", 0.1)
    assert TrainConfig(dataset="cifar10").eps == pytest.approx(8 / 255)
    for bad in ({"method": "trades"}, {"dataset": "mnist"}, {"epochs": 0}, {"select_metric": "cw.average"},
                {"select_metric": "pgd20.best"}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    # Values that would only fail at the first attack step or after training, at the final test.
    for bad in ({"eps": -0.1}, {"eps": float("nan")}, {"alpha": -1.0}, {"alpha": float("inf")}, {"lr": 0.0},
                {"lr": float("nan")}, {"beta": -0.1}, {"test_attacks": ("pgd",)}, {"test_attacks": ()},
                {"val_attacks": ("clean", "x")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_teacher_hash_tracks_recipe():
    cfg = TrainConfig()
    assert config_hash(teacher_config(cfg)) == config_hash(teacher_config(TrainConfig(method="rslad", seed=5)))
    assert config_hash(teacher_config(cfg)) != config_hash(teacher_config(TrainConfig(teacher_epochs=3)))
    assert config_hash(teacher_config(cfg)) == config_hash(teacher_config(TrainConfig(device="cuda", progress=False)))


# ---------------------------------------------------------------- end to end

TINY = dict(epochs=2, batch_size=64, steps=2, train_subset=128, progress=False, test_attacks=("clean", "pgd20"))


def _teacher():
    torch.manual_seed(123)
    return build_model("cnn-s", 10, 1).eval()


@pytest.fixture(scope="module")
def digits():
    return load_digits(0)


def test_end_to_end_absld_run_folder(tmp_path, digits):
    cfg = TrainConfig(method="absld", **TINY)
    result = train(cfg, str(tmp_path), teacher=_teacher(), data=digits, log=lambda *_: None)
    for name in ("metrics.json", "last.pt", "best.pt", "per_class.png", "temperatures.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["method"] == "absld" and len(metrics["history"]) == 2
    for entry in metrics["history"]:
        assert math.isfinite(entry["train_loss"]) and entry["train_loss"] > 0
        assert len(entry["tau_adv"]) == 10 and len(entry["tau_nat"]) == 10
        assert set(entry["val"]) == {"clean", "pgd20"}
    # The temperatures moved (risks differ across classes) and stay in the clip range.
    taus = np.array(metrics["history"][-1]["tau_adv"])
    assert not np.allclose(taus, 1.0) and np.all((taus >= 0.5) & (taus <= 5.0))
    assert set(metrics["test"]) == {"clean", "pgd20"}
    assert len(metrics["test"]["pgd20"]["per_class"]) == 10
    assert metrics["best"]["epoch"] in (1, 2)
    # The returned model holds the selected (best) weights.
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert all(torch.equal(v, result["model"].state_dict()[k]) for k, v in best["model"].items())


def test_rslad_keeps_unit_temperatures_and_pgd_at_runs(digits):
    rslad = train(TrainConfig(method="rslad", **TINY), None, teacher=_teacher(), data=digits, log=lambda *_: None)
    assert all(t == 1.0 for t in rslad["history"][-1]["tau_adv"] + rslad["history"][-1]["tau_nat"])
    pgd_at = train(TrainConfig(method="pgd-at", **dict(TINY, epochs=1)), None, data=digits, log=lambda *_: None)
    assert "tau_adv" not in pgd_at["history"][0] and math.isfinite(pgd_at["history"][0]["train_loss"])


def test_teacher_is_trained_once_then_cached(tmp_path, digits, monkeypatch):
    cfg = TrainConfig(teacher_epochs=1, cache_dir=str(tmp_path), progress=False,
                      batch_size=128, steps=1)
    first = get_teacher(cfg, data=digits, log=lambda *_: None)
    files = [f for f in os.listdir(tmp_path) if f.endswith(".pt")]
    assert len(files) == 1 and files[0].startswith("teacher-digits-cnn-l-")
    assert not first.training and not any(p.requires_grad for p in first.parameters())

    def no_training(*args, **kwargs):
        raise AssertionError("the cached teacher was retrained")

    monkeypatch.setattr(train_mod, "train", no_training)
    again = get_teacher(dataclasses.replace(cfg, method="rslad", seed=9), data=digits)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def _fake_cifar(folder, per_batch, classes, files, label_key):
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in files:
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 label_key: [i % classes for i in range(per_batch)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_local_pickle_folder(tmp_path, name):
    if name == "cifar10":
        _fake_cifar(tmp_path / "cifar-10-batches-py", 20, 10,
                    [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels")
    else:
        _fake_cifar(tmp_path / "cifar-100-python", 200, 100, ["train", "test"], "fine_labels")
    data = load_dataset(name, data_dir=str(tmp_path), val_size=20 if name == "cifar10" else 100)
    n_train = 100 if name == "cifar10" else 200
    classes = 10 if name == "cifar10" else 100
    assert data.num_classes == classes and data.augment and data.in_channels == 3
    assert data.train[0].shape == (n_train - len(data.val[1]), 3, 32, 32) and data.test[0].shape[1:] == (3, 32, 32)
    assert np.bincount(data.val[1].numpy(), minlength=classes).tolist() == [len(data.val[1]) // classes] * classes
    # Pixels are the pickle's bytes / 255 in (C, H, W) order.
    with open(os.path.join(tmp_path, CIFAR_FOLDERS[name], "test_batch" if name == "cifar10" else "test"), "rb") as f:
        raw = pickle.load(f)["data"]
    assert torch.allclose(data.test[0][3], torch.from_numpy(raw[3].reshape(3, 32, 32)).float() / 255)
    loader = TensorLoader(*data.train, 16, shuffle=True, augment=True)
    x, _ = next(iter(loader))
    assert x.shape == (16, 3, 32, 32)


def test_missing_cifar_folder_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar("cifar10", str(tmp_path), download=False)
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("svhn")
