"""Data sets of the recipe: the digits split, the stratified splitter, the tensor loader, augmentation, CIFAR."""

import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastabsld.recipe.data import (
    CIFAR_FOLDERS,
    DIGITS_SPLIT,
    TensorLoader,
    crop_flip,
    load_cifar,
    load_dataset,
    load_digits,
    stratified_split,
)


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
