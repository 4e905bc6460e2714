"""Data sets of the recipe: scikit-learn's digits (embedded, offline) and CIFAR-10/100.

Inputs are float tensors in [0, 1] of shape (N, C, H, W), labels int64; no normalisation.

Digits (1797 images, 8x8, 10 classes): a seeded stratified split into
``DIGITS_SPLIT = {"train": 897, "val": 180, "test": 720}``. The test split is as large as
training allows (72 images per class: one image moves a class's accuracy by 1.4 points, so a
fairness comparison on digits needs several seeds); the validation split (18 per class) is only
for checkpoint selection.

CIFAR: read from ``data_dir`` in the standard python pickle format (``cifar-10-batches-py`` /
``cifar-100-python``), downloaded with torchvision when it is installed and the folder is
missing. The last ``val_size`` images of a seeded stratified permutation of the training set form
the validation split; training batches are augmented with a 4-pixel padded random crop and a
horizontal flip.
"""

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

DIGITS_SPLIT = {"train": 897, "val": 180, "test": 720}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
DATASETS = ("digits", "cifar10", "cifar100")


@dataclass
class Splits:
    """Tensors of a data set's three splits.

    Attributes:
        train, val, test: (x, y) pairs, x float (N, C, H, W) in [0, 1], y int64 (N,).
        num_classes: number of classes.
        augment: whether training batches get crop+flip augmentation.
        class_names: the classes' names when the data set has them (plots), else None.
    """

    train: tuple
    val: tuple
    test: tuple
    num_classes: int
    augment: bool = False
    class_names: tuple = None

    @property
    def in_channels(self):
        """Channels of the inputs."""
        return self.train[0].shape[1]


def stratified_split(labels, sizes, seed):
    """Splits indices into consecutive parts with (nearly) equal class proportions.

    Each class's indices are permuted with ``seed`` and dealt to the parts in proportion to
    ``sizes`` (largest-remainder rounding per class, then exact totals), so every part holds every
    class in the proportions of the whole.

    Args:
        labels: (N,) integer array.
        sizes: part sizes summing to N.
        seed: seed of the permutation.

    Returns:
        list of int64 numpy arrays, one per part, each in a seeded random order.
    """
    labels = np.asarray(labels)
    if sum(sizes) != len(labels):
        raise ValueError(f"sizes must sum to the number of samples {len(labels)}, got {sizes} (sum {sum(sizes)})")
    rng = np.random.default_rng(seed)
    fractions = np.asarray(sizes, dtype=np.float64) / len(labels)
    classes = np.unique(labels)
    # quota[c, p]: how many of class c go to part p; floors first, remainders fixed below.
    counts = np.array([(labels == c).sum() for c in classes])
    ideal = counts[:, None] * fractions[None, :]
    quota = np.floor(ideal).astype(np.int64)
    remainder = ideal - quota
    # Give each part its missing samples, taking from the classes with the largest remainders that still
    # have samples left over.
    for p in np.argsort(-fractions, kind="stable"):
        missing = sizes[p] - quota[:, p].sum()
        while missing > 0:
            for c in np.argsort(-remainder[:, p], kind="stable"):
                if missing > 0 and quota[c].sum() < counts[c]:
                    quota[c, p] += 1
                    missing -= 1
    parts = [[] for _ in sizes]
    for ci, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for p in range(len(sizes)):
            parts[p].append(idx[start:start + quota[ci, p]])
            start += quota[ci, p]
    return [rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts]


def load_digits(seed=0):
    """scikit-learn's handwritten digits as 8x8 grayscale images, split per ``DIGITS_SPLIT``.

    Args:
        seed: seed of the stratified split.

    Returns:
        Splits: the three splits (inputs (N, 1, 8, 8) in [0, 1]) and 10 classes.
    """
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(data.target.astype(np.int64))
    parts = stratified_split(data.target, [DIGITS_SPLIT[k] for k in ("train", "val", "test")], seed)
    train, val, test = ((x[torch.from_numpy(i)], y[torch.from_numpy(i)]) for i in parts)
    return Splits(train, val, test, num_classes=10)


def _unpickle(path):
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    y = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
    return x, y


def load_cifar(name, data_dir, *, val_size=1000, seed=0, download=True):
    """CIFAR-10 or CIFAR-100 from the standard python pickle folder.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py`` / ``cifar-100-python``.
        val_size: training images held out for validation (stratified).
        seed: seed of the validation split.
        download: download with torchvision when the folder is missing and torchvision is installed.

    Returns:
        Splits: train/val/test (inputs (N, 3, 32, 32) in [0, 1]), with augmentation on.
    """
    folder = os.path.join(data_dir, CIFAR_FOLDERS[name])
    if not os.path.isdir(folder):
        try:
            import torchvision
        except ImportError:
            torchvision = None
        if not download or torchvision is None:
            raise FileNotFoundError(f"{folder} not found; put the python version of {name} there or install "
                                    "torchvision to download it")
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(data_dir, train=True, download=True)
    if name == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, num_classes = ["test_batch"], 10
    else:
        train_files, test_files, num_classes = ["train"], ["test"], 100
    xs, ys = zip(*(_unpickle(os.path.join(folder, f)) for f in train_files))
    x_train, y_train = np.concatenate(xs), np.concatenate(ys)
    x_test, y_test = _unpickle(os.path.join(folder, test_files[0]))
    train_idx, val_idx = stratified_split(y_train, [len(y_train) - val_size, val_size], seed)
    meta = os.path.join(folder, "batches.meta" if name == "cifar10" else "meta")
    names = None
    if os.path.exists(meta):
        with open(meta, "rb") as f:
            names = tuple(pickle.load(f, encoding="latin1").get("label_names" if name == "cifar10" else
                                                                 "fine_label_names") or ()) or None

    def to_tensors(x, y):
        return torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y)

    return Splits(to_tensors(x_train[train_idx], y_train[train_idx]), to_tensors(x_train[val_idx], y_train[val_idx]),
                  to_tensors(x_test, y_test), num_classes, augment=True, class_names=names)


def load_dataset(name, *, data_dir=None, seed=0, val_size=1000):
    """Loads a data set by name.

    Args:
        name: ``"digits"``, ``"cifar10"`` or ``"cifar100"``.
        data_dir: CIFAR folder (default ``./data``).
        seed: seed of the split.
        val_size: CIFAR validation size.

    Returns:
        Splits: the data.
    """
    if name == "digits":
        return load_digits(seed)
    if name in CIFAR_FOLDERS:
        return load_cifar(name, data_dir or "data", val_size=val_size, seed=seed)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def crop_flip(x, generator, padding=4):
    """Random crop with zero padding and random horizontal flip, per image, on a batch.

    Args:
        x: (B, C, H, W) batch.
        generator: torch.Generator on x's device driving the randomness.
        padding: pixels of zero padding before cropping back to (H, W).

    Returns:
        Tensor: the augmented batch, same shape.
    """
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # (B, H)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # (B, W)
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class TensorLoader:
    """Batches of in-memory tensors, shuffled with its own generator (much faster than a DataLoader).

    The shuffle order is a function of the generator's state only, so saving ``generator.get_state()``
    with a checkpoint makes the batch order of a resumed run identical to the uninterrupted run.

    Args:
        x: (N, ...) inputs.
        y: (N,) labels.
        batch_size: batch size; the last batch may be smaller (unless ``drop_last``).
        shuffle: reshuffle every epoch.
        seed: seed of the generator.
        augment: apply :func:`crop_flip` to each batch (with the same generator).
        drop_last: drop a final incomplete batch.
    """

    def __init__(self, x, y, batch_size, *, shuffle=False, seed=0, augment=False, drop_last=False):
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.x[idx]
            if self.augment:
                x = crop_flip(x, self.generator)
            yield x, self.y[idx]
