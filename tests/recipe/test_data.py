"""Data sets of the recipe: the digits split, the stratified splitter, the tensor loader, augmentation, CIFAR."""

import os
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastabsld.recipe.data import (
    CIFAR_FOLDERS,
    DIGITS_SPLIT,
    StreamLoader,
    TensorLoader,
    as_splits,
    balanced_subset,
    crop_flip,
    is_tensors,
    load_cifar,
    load_dataset,
    load_digits,
    load_folder,
    split_size,
    stratified_split,
)
from tests.recipe.conftest import png_folder


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
    """A CIFAR folder in the python pickle layout, with random pixels and a meta file of class names."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in files:
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 label_key: [i % classes for i in range(per_batch)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    meta, key = ("batches.meta", "label_names") if label_key == "labels" else ("meta", "fine_label_names")
    with open(os.path.join(folder, meta), "wb") as f:
        pickle.dump({key: [f"class{k}" for k in range(classes)]}, f)


def _make_cifar(root, name):
    if name == "cifar10":
        _fake_cifar(root / "cifar-10-batches-py", 20, 10, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                    "labels")
    else:
        _fake_cifar(root / "cifar-100-python", 200, 100, ["train", "test"], "fine_labels")


@pytest.fixture(params=["torchvision", "pickle"])
def cifar_reader(request, monkeypatch):
    """CIFAR read by torchvision's classes (their checksum test passed for the fake files) or by the pickle reader."""
    if request.param == "torchvision":
        import torchvision.datasets.cifar

        monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    else:
        monkeypatch.setitem(sys.modules, "torchvision", None)
    return request.param


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_local_pickle_folder(tmp_path, name, cifar_reader):
    _make_cifar(tmp_path, name)
    data = load_dataset(name, data_dir=str(tmp_path), val_size=20 if name == "cifar10" else 100)
    n_train = 100 if name == "cifar10" else 200
    classes = 10 if name == "cifar10" else 100
    assert data.num_classes == classes and data.augment and data.in_channels == 3
    assert data.class_names == tuple(f"class{k}" for k in range(classes))
    assert data.train[0].shape == (n_train - len(data.val[1]), 3, 32, 32) and data.test[0].shape[1:] == (3, 32, 32)
    assert np.bincount(data.val[1].numpy(), minlength=classes).tolist() == [len(data.val[1]) // classes] * classes
    # Pixels are the pickle's bytes / 255 in (C, H, W) order.
    with open(os.path.join(tmp_path, CIFAR_FOLDERS[name], "test_batch" if name == "cifar10" else "test"), "rb") as f:
        raw = pickle.load(f)["data"]
    assert torch.allclose(data.test[0][3], torch.from_numpy(raw[3].reshape(3, 32, 32)).float() / 255)
    loader = TensorLoader(*data.train, 16, shuffle=True, augment=True)
    x, _ = next(iter(loader))
    assert x.shape == (16, 3, 32, 32)


def test_missing_cifar_says_where_it_looked_and_what_it_expects(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as error:
        load_cifar("cifar10", str(tmp_path), download=False)
    message = str(error.value)
    assert str(tmp_path) in message and "cifar-10-python.tar.gz" in message and "data_batch_1" in message
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("svhn")
    # Offline with torchvision: the failed download is named, with the same hints.
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(FileNotFoundError, match="the download failed") as error:
        load_cifar("cifar10", str(tmp_path))
    assert "cifar-10-python.tar.gz" in str(error.value) and str(tmp_path) in str(error.value)


def test_a_placed_cifar_archive_is_used_offline(tmp_path, monkeypatch):
    source = tmp_path / "source"
    _make_cifar(source, "cifar10")
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # no download possible either
    data = load_cifar("cifar10", str(tmp_path / "data"), val_size=20)
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").exists() and len(data.test[1]) == 20


def test_corrupted_cifar_is_an_error_naming_the_folder(tmp_path):
    _make_cifar(tmp_path, "cifar10")  # the fake files fail torchvision's checksum test
    with pytest.raises(ValueError, match="corrupted") as error:
        load_cifar("cifar10", str(tmp_path))
    assert "cifar-10-batches-py" in str(error.value)


def test_image_folder_split_stratified_with_class_names(tmp_path):
    png_folder(tmp_path / "imgs")
    data = load_folder(str(tmp_path / "imgs"), fractions=(0.6, 0.2, 0.2), seed=1)
    assert data.class_names == ("cat", "dog", "eel") and data.num_classes == 3 and not data.augment
    for split, size in ((data.train, 18), (data.val, 6), (data.test, 6)):
        x, y = split
        assert x.shape == (size, 3, 6, 6) and y.dtype == torch.int64
        assert np.bincount(y.numpy(), minlength=3).tolist() == [size // 3] * 3
        torch.testing.assert_close((x[:, 0, 0, 0] * 255 / 100).round().long(), y)  # labels match the images
    assert data.source.startswith("folder/") and data.source == load_folder(str(tmp_path / "imgs")).source
    resized = load_folder(str(tmp_path / "imgs"), image_size=4)
    assert resized.train[0].shape[1:] == (3, 4, 4) and resized.source != data.source


def test_image_folder_with_train_and_test_subfolders(tmp_path):
    png_folder(tmp_path / "d" / "train", per_class=8)
    png_folder(tmp_path / "d" / "test", classes=("dog", "eel"), per_class=3)  # a class missing: indices follow train
    data = load_folder(str(tmp_path / "d"), fractions=(0.75, 0.25, 0.25))
    assert data.class_names == ("cat", "dog", "eel")
    assert sorted(data.test[1].tolist()) == [1] * 3 + [2] * 3
    torch.testing.assert_close((data.test[0][:, 0, 0, 0] * 255 / 100).round().long(), data.test[1])
    assert len(data.train[1]) + len(data.val[1]) == 24 and len(data.val[1]) == 6  # val carved out of train


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images") as error:
        load_folder(str(tmp_path / "empty"))
    assert "<class>/<image>" in str(error.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_folder(str(tmp_path / "missing"))
    png_folder(tmp_path / "odd", odd=(5, 7))
    with pytest.raises(ValueError, match="different sizes"):
        load_folder(str(tmp_path / "odd"))
    assert load_folder(str(tmp_path / "odd"), image_size=6).train[0].shape[1:] == (3, 6, 6)


def test_datasets_are_materialised_or_streamed():
    x = torch.rand(40, 1, 4, 4)
    y = torch.arange(40) % 4
    dataset = torch.utils.data.TensorDataset(x, y)
    loaded = as_splits(dataset, num_classes=4, fractions=(0.5, 0.25, 0.25))
    assert all(is_tensors(s) for s in (loaded.train, loaded.val, loaded.test))
    together = torch.cat([loaded.train[0], loaded.val[0], loaded.test[0]])
    assert sorted(map(tuple, together.reshape(40, -1).tolist())) == sorted(map(tuple, x.reshape(40, -1).tolist()))
    streamed = as_splits(dataset, num_classes=4, fractions=(0.5, 0.25, 0.25), in_memory_mb=0)
    assert not is_tensors(streamed.train) and split_size(streamed.train) == 20 and streamed.in_channels == 1
    assert streamed.source != loaded.source or streamed.source.startswith("custom/")
    # The streamed loader's order is a function of its generator state: a resumed run replays it.
    loader = StreamLoader(streamed.train, 8, seed=3)
    state = loader.generator.get_state()
    first = [b[1].tolist() for b in loader]
    loader.generator.set_state(state)
    assert [b[1].tolist() for b in loader] == first
    explicit = as_splits({"train": (x[:20], y[:20]), "val": (x[20:30], y[20:30]), "test": dataset})
    assert explicit.num_classes == 4 and is_tensors(explicit.test)


@pytest.mark.parametrize("bad, match", [
    ((torch.rand(8, 1, 4, 4) * 2, torch.arange(8) % 2), r"\[0, 1\]"),
    ((torch.rand(8, 1, 4, 4), torch.arange(8) % 2 + 0.5), "integers"),
    ((torch.rand(8, 4, 4), torch.arange(8) % 2), "N, C, H, W"),
])
def test_data_contract_violations_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        as_splits({"train": bad, "val": bad, "test": bad})
    with pytest.raises(ValueError, match="num_classes=2"):
        as_splits({"train": (torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 1]))}, num_classes=2)


def test_balanced_subset_keeps_class_proportions():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    x = torch.arange(100.0)[:, None]
    sub_x, sub_y = balanced_subset((x, y), 10, seed=2)
    assert np.bincount(sub_y.numpy()).tolist() == [5, 3, 2]
    assert torch.equal(y[sub_x[:, 0].long()], sub_y)
    assert balanced_subset((x, y), 500)[1] is y
