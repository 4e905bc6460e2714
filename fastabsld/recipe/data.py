"""Data sets of the recipe: scikit-learn's digits (embedded, offline), CIFAR-10/100, image folders and
any ``torch.utils.data.Dataset`` given in Python.

The contract of every data set: images are float tensors (C, H, W) in [0, 1] (no normalisation:
put it inside the model if it needs one), labels are integers in [0, num_classes) (int64 once
batched).

Digits (1797 images, 8x8, 10 classes): a seeded stratified split into
``DIGITS_SPLIT = {"train": 897, "val": 180, "test": 720}``. The test split is as large as
training allows (72 images per class: one image moves a class's accuracy by 1.4 points, so a
fairness comparison on digits needs several seeds); the validation split (18 per class) is only
for checkpoint selection.

CIFAR: ``data_dir`` holds the python version (``cifar-10-batches-py`` / ``cifar-100-python``), read
with torchvision's CIFAR classes where torchvision is installed (they check the files' checksums),
else with a plain pickle reader. A downloaded archive placed in ``data_dir``
(``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``) is extracted there, offline; when
neither is there and torchvision is installed, it is downloaded. The last ``val_size`` images of a
seeded stratified permutation of the training set form the validation split; training batches are
augmented with a 4-pixel padded random crop and a horizontal flip.

Image folders (``load_folder``): ``root/train/<class>/<image>`` with optional ``root/val`` and
``root/test`` next to it, or ``root/<class>/<image>`` split by a seeded stratified split (images in
any format PIL reads, converted to RGB).

Memory: a data set whose images fit in ``in_memory_mb`` (as float32 tensors) is loaded into
memory once and batched by :class:`TensorLoader`, which is much faster than a DataLoader on small
images and whose generator state makes a resumed run bit-exact. A larger one stays a Dataset and
is streamed through a DataLoader each epoch (:class:`StreamLoader`; the batch order still resumes
exactly, random transforms of the Dataset itself do not).
"""

import hashlib
import inspect
import os
import pickle
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

DIGITS_SPLIT = {"train": 897, "val": 180, "test": 720}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
DATASETS = ("digits", "cifar10", "cifar100", "folder", "custom")
FOLDER_SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


@dataclass
class Splits:
    """A data set's three splits.

    Attributes:
        train, val, test: each an (x, y) pair of tensors (x float (N, C, H, W) in [0, 1], y int64 (N,)),
            or a ``torch.utils.data.Dataset`` of (image, label) pairs to stream, or a ``DataLoader``
            used as it is.
        num_classes: number of classes.
        augment: whether training batches get crop+flip augmentation.
        class_names: the classes' names when the data set has them (plots, reports), else None.
        source: a string identifying the data (the teacher cache is keyed by it).
    """

    train: object
    val: object
    test: object
    num_classes: int
    augment: bool = False
    class_names: tuple = None
    source: str = None

    @property
    def in_channels(self):
        """Channels of the inputs."""
        return first_images(self.train).shape[1]


def is_tensors(split):
    """Whether a split is an in-memory (x, y) pair of tensors.

    Args:
        split: a split of :class:`Splits`.

    Returns:
        bool: True for an (x, y) tensor pair.
    """
    return isinstance(split, (tuple, list)) and len(split) == 2 and all(isinstance(t, torch.Tensor) for t in split)


def split_size(split):
    """Number of samples of a split.

    Args:
        split: (x, y) tensors, a Dataset or a DataLoader.

    Returns:
        int: the number of samples.
    """
    if is_tensors(split):
        return len(split[1])
    return len(split.dataset if isinstance(split, DataLoader) else split)


def first_images(split):
    """A batch of one or more images of a split, (B, C, H, W) (read once, for shapes and checks).

    Args:
        split: (x, y) tensors, a Dataset or a DataLoader.

    Returns:
        Tensor: images.
    """
    if is_tensors(split):
        return split[0][:1]
    if isinstance(split, DataLoader):
        return next(iter(split))[0]
    return torch.as_tensor(split[0][0]).unsqueeze(0)


def subset(split, n):
    """The first ``n`` samples of a split (``n`` None: the split itself).

    Args:
        split: (x, y) tensors or a Dataset.
        n: number of samples to keep, or None.

    Returns:
        the same kind of split, shortened.
    """
    if n is None:
        return split
    if is_tensors(split):
        return split[0][:n], split[1][:n]
    if isinstance(split, DataLoader):
        raise ValueError("train_subset cannot shorten a DataLoader given as the training split: pass its Dataset")
    return Subset(split, range(min(n, len(split))))


def eval_loader(split, batch_size, num_workers=0):
    """Batches of a split in order (evaluation).

    Args:
        split: (x, y) tensors, a Dataset or a DataLoader (returned as it is).
        batch_size: batch size.
        num_workers: DataLoader workers for a Dataset.

    Returns:
        iterable of (x, y) batches.
    """
    if is_tensors(split):
        return TensorLoader(split[0], split[1], batch_size)
    if isinstance(split, DataLoader):
        return split
    return DataLoader(split, batch_size=batch_size, shuffle=False, num_workers=num_workers)


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
    return Splits(train, val, test, num_classes=10, class_names=tuple(str(k) for k in range(10)),
                  source=f"digits/split{seed}")


def _unpickle(path):
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    y = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
    return x, y


def _torchvision():
    try:
        import torchvision
    except ImportError:
        return None
    return torchvision


def _cifar_missing(name, data_dir, reason=None):
    folder = os.path.join(data_dir, CIFAR_FOLDERS[name])
    files = ("data_batch_1 ... data_batch_5, test_batch, batches.meta" if name == "cifar10"
             else "train, test, meta")
    message = (f"{name} not found: searched {os.path.abspath(folder)}, which must hold the python version "
               f"({files}); place the archive {CIFAR_ARCHIVES[name]} in {os.path.abspath(data_dir)} to use it "
               f"offline, or pass --data-dir with the folder that holds {CIFAR_FOLDERS[name]}")
    return FileNotFoundError(message + (f" ({reason})" if reason else ""))


def _extract_archive(archive, data_dir):
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(data_dir, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"{archive} could not be extracted ({type(error).__name__}: {error})") from error


def _cifar_classes(folder, name):
    meta = os.path.join(folder, "batches.meta" if name == "cifar10" else "meta")
    if not os.path.exists(meta):
        return None
    with open(meta, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    return tuple(entry["label_names" if name == "cifar10" else "fine_label_names"])


def _read_cifar(name, data_dir, torchvision):
    """(x_train, y_train, x_test, y_test, classes) as uint8 (N, 3, 32, 32) and int64 arrays."""
    folder = os.path.join(data_dir, CIFAR_FOLDERS[name])
    if torchvision is not None:
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            train, test = cls(data_dir, train=True), cls(data_dir, train=False)
        except RuntimeError as error:
            raise ValueError(f"{os.path.abspath(folder)} holds an incomplete or corrupted {name} (torchvision's "
                             f"checksum test failed: {error}); remove it and place {CIFAR_ARCHIVES[name]} in "
                             f"{os.path.abspath(data_dir)}") from error
        arrays = [np.ascontiguousarray(d.data.transpose(0, 3, 1, 2)) for d in (train, test)]
        return (arrays[0], np.asarray(train.targets, dtype=np.int64), arrays[1],
                np.asarray(test.targets, dtype=np.int64), tuple(train.classes))
    if name == "cifar10":
        train_files, test_file = [f"data_batch_{i}" for i in range(1, 6)], "test_batch"
    else:
        train_files, test_file = ["train"], "test"
    try:
        xs, ys = zip(*(_unpickle(os.path.join(folder, f)) for f in train_files))
        x_test, y_test = _unpickle(os.path.join(folder, test_file))
    except FileNotFoundError as error:
        raise _cifar_missing(name, data_dir, f"missing file {error.filename}") from error
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as error:
        raise ValueError(f"{os.path.abspath(folder)} holds a corrupted {name} ({type(error).__name__}: {error})") \
            from error
    return np.concatenate(xs), np.concatenate(ys), x_test, y_test, _cifar_classes(folder, name)


def load_cifar(name, data_dir, *, val_size=1000, seed=0, download=True):
    """CIFAR-10 or CIFAR-100 from the standard python version in ``data_dir`` (see the module docstring).

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py`` / ``cifar-100-python``, or the
            archive ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``.
        val_size: training images held out for validation (stratified).
        seed: seed of the validation split.
        download: download with torchvision when neither the folder nor the archive is there.

    Returns:
        Splits: train/val/test (inputs (N, 3, 32, 32) in [0, 1]), with augmentation on.

    Raises:
        FileNotFoundError: the data is not there (and could not be downloaded), naming the folder searched
            and the layout expected.
        ValueError: the files are corrupted.
    """
    folder = os.path.join(data_dir, CIFAR_FOLDERS[name])
    archive = os.path.join(data_dir, CIFAR_ARCHIVES[name])
    torchvision = _torchvision()
    if not os.path.isdir(folder) and os.path.isfile(archive):
        _extract_archive(archive, data_dir)
    if not os.path.isdir(folder):
        if not download or torchvision is None:
            raise _cifar_missing(name, data_dir, None if torchvision else "torchvision is not installed to download it")
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(data_dir, train=True, download=True)
        except Exception as error:  # offline: urllib's URLError, a proxy's HTTPError, a timeout...
            raise _cifar_missing(name, data_dir, f"the download failed: {type(error).__name__}: {error}") from error
    x_train, y_train, x_test, y_test, classes = _read_cifar(name, data_dir, torchvision)
    train_idx, val_idx = stratified_split(y_train, [len(y_train) - val_size, val_size], seed)
    def to_tensors(x, y):
        return torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y)

    return Splits(to_tensors(x_train[train_idx], y_train[train_idx]), to_tensors(x_train[val_idx], y_train[val_idx]),
                  to_tensors(x_test, y_test), 100 if name == "cifar100" else 10, augment=True, class_names=classes,
                  source=f"{name}/val{val_size}/split{seed}")


def _fraction_sizes(n, fractions):
    """Part sizes of n samples in proportion to fractions (largest remainder, every part >= 1 when n allows)."""
    ideal = np.asarray(fractions, dtype=np.float64) / sum(fractions) * n
    sizes = np.floor(ideal).astype(int)
    for i in np.argsort(-(ideal - sizes), kind="stable")[:n - sizes.sum()]:
        sizes[i] += 1
    for i in range(len(sizes)):  # no empty part while another can spare one
        if sizes[i] == 0 and sizes.max() > 1:
            sizes[np.argmax(sizes)] -= 1
            sizes[i] += 1
    return [int(v) for v in sizes]


def dataset_labels(dataset):
    """The labels of a Dataset: its ``targets`` attribute when it has one (ImageFolder, CIFAR), else read item by item.

    Args:
        dataset: a map-style Dataset of (image, label) pairs (or a Subset of one).

    Returns:
        np.ndarray: int64 labels.
    """
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def split_dataset(dataset, fractions, seed):
    """A seeded stratified split of a Dataset into len(fractions) Subsets.

    Args:
        dataset: a map-style Dataset of (image, label) pairs.
        fractions: the parts' shares.
        seed: seed of the split.

    Returns:
        list of Subset: the parts.
    """
    labels = dataset_labels(dataset)
    parts = stratified_split(labels, _fraction_sizes(len(labels), fractions), seed)
    return [Subset(dataset, part.tolist()) for part in parts]


def _folder_empty(root):
    return FileNotFoundError(f"{root} holds no images: expected {root}/<class>/<image> (PNG, JPEG, ... one folder per "
                             f"class), or {root}/train/<class>/<image> with optional {root}/val and {root}/test")


def folder_fingerprint(root, image_size=None):
    """A string identifying an image folder's content: a hash of every file's relative path and size.

    Args:
        root: the folder.
        image_size: the resize applied (part of the identity).

    Returns:
        str: ``folder/<16 hex digits>``.
    """
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            entries.append(f"{os.path.relpath(path, root)}:{os.path.getsize(path)}")
    digest = hashlib.sha256("\n".join(entries + [f"size={image_size}"]).encode()).hexdigest()[:16]
    return f"folder/{digest}"


def load_folder(root, *, image_size=None, fractions=DEFAULT_FRACTIONS, seed=0, in_memory_mb=4096, num_workers=0):
    """An image folder as Splits (see the module docstring for the layouts).

    With ``train/`` (and optionally ``val/``, ``test/``) subfolders, those are the splits; a missing
    val or test split is carved out of train by a seeded stratified split with the shares of
    ``fractions``. Without them, the class folders of ``root`` are split by ``fractions``.

    Args:
        root: the folder.
        image_size: resize every image to ``image_size`` x ``image_size`` (None: keep the sizes, which must
            agree).
        fractions: (train, val, test) shares of a split.
        seed: seed of the split.
        in_memory_mb: load into memory when the images take at most this many MiB as float32.
        num_workers: DataLoader workers that read the images.

    Returns:
        Splits: the splits, classes named after the class folders.

    Raises:
        FileNotFoundError: no folder, or no images in it (naming the layout expected).
        ImportError: torchvision (which reads the folder) is not installed.
    """
    torchvision = _torchvision()
    if torchvision is None:
        raise ImportError("the folder data set needs torchvision (and Pillow): `pip install torchvision`")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} not found")
    from torchvision import transforms

    steps = ([transforms.Resize((image_size, image_size))] if image_size else []) + [transforms.ToTensor()]
    transform = transforms.Compose(steps)
    present = [s for s in FOLDER_SPLITS if os.path.isdir(os.path.join(root, s))]

    def image_folder(path, classes=None):
        try:
            found = torchvision.datasets.ImageFolder(path, transform=transform)
        except FileNotFoundError as error:
            raise _folder_empty(root) from error
        if classes is not None and found.classes != classes:
            extra = sorted(set(found.classes) - set(classes))
            if extra:
                raise ValueError(f"{path} has classes that {root}/train lacks: {', '.join(extra)}")
            index = {name: classes.index(name) for name in found.classes}
            found.samples = [(p, index[found.classes[t]]) for p, t in found.samples]
            found.targets = [t for _, t in found.samples]
            found.classes, found.class_to_idx = list(classes), {c: i for i, c in enumerate(classes)}
        return found

    if "train" in present:
        train = image_folder(os.path.join(root, "train"))
        parts = {"train": train}
        for name in ("val", "test"):
            if name in present:
                parts[name] = image_folder(os.path.join(root, name), train.classes)
        missing = [name for name in ("val", "test") if name not in parts]
        if missing:
            shares = [fractions[0]] + [fractions[FOLDER_SPLITS.index(m)] for m in missing]
            carved = split_dataset(train, shares, seed)
            parts["train"] = carved[0]
            parts.update(zip(missing, carved[1:]))
        classes = train.classes
    else:
        whole = image_folder(root)
        parts = dict(zip(FOLDER_SPLITS, split_dataset(whole, fractions, seed)))
        classes = whole.classes
    return as_splits(parts, num_classes=len(classes), classes=classes, in_memory_mb=in_memory_mb,
                     num_workers=num_workers, source=folder_fingerprint(root, image_size), where=root)


def _content_hash(*tensors):
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _materialise(dataset, num_workers, where):
    """(x, y) tensors of every item of a Dataset (read in batches through a DataLoader)."""
    xs, ys = [], []
    try:
        for x, y in DataLoader(dataset, batch_size=256, shuffle=False, num_workers=num_workers):
            xs.append(torch.as_tensor(x))
            ys.append(torch.as_tensor(y))
    except RuntimeError as error:
        if "stack expects each tensor to be equal size" in str(error) or "equal size" in str(error):
            raise ValueError(f"the images of {where} have different sizes; resize them to one size "
                             "(--image-size N for an image folder)") from error
        raise
    if not xs:
        raise ValueError(f"{where} holds no samples")
    return torch.cat(xs), torch.cat(ys)


def _check_tensors(x, y, where, num_classes=None):
    """Checks the data contract on (x, y) tensors; returns them with y as int64."""
    if not torch.is_floating_point(x) or x.dim() != 4:
        raise ValueError(f"the images of {where} must be float tensors (N, C, H, W) in [0, 1], got {x.dtype} "
                         f"{tuple(x.shape)}")
    if torch.is_floating_point(y) or torch.is_complex(y) or y.dim() != 1 or len(y) != len(x):
        raise ValueError(f"the labels of {where} must be N integers, got {y.dtype} {tuple(y.shape)} for "
                         f"{len(x)} images")
    if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
        raise ValueError(f"the images of {where} must lie in [0, 1] (no normalisation: put it inside the model), "
                         f"got values from {float(x.min()):.4g} to {float(x.max()):.4g}")
    y = y.to(torch.int64)
    if num_classes is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"the labels of {where} must lie in [0, num_classes={num_classes}), got {int(y.min())} to "
                         f"{int(y.max())}")
    return x, y


def _bytes_per_item(dataset):
    image = torch.as_tensor(dataset[0][0])
    return image.numel() * 4


def _prepare_split(split, where, in_memory_mb, num_workers):
    """A split as tensors (when it fits in memory) or as it is (a Dataset to stream, a DataLoader)."""
    if is_tensors(split):
        return split
    if isinstance(split, DataLoader):
        return split
    if not isinstance(split, Dataset) and not (hasattr(split, "__getitem__") and hasattr(split, "__len__")):
        raise ValueError(f"{where} must be (x, y) tensors, a torch.utils.data.Dataset or a DataLoader, got "
                         f"{type(split).__name__}")
    if len(split) == 0:
        raise ValueError(f"{where} holds no samples")
    if len(split) * _bytes_per_item(split) <= in_memory_mb * 2 ** 20:
        return _materialise(split, num_workers, where)
    return split


def _split_source(split):
    if is_tensors(split):
        return _content_hash(*split)
    dataset = split.dataset if isinstance(split, DataLoader) else split
    n = len(dataset)
    picks = sorted({0, n // 2, n - 1})  # a streamed data set is identified by its size and a few samples
    return _content_hash(torch.tensor([n]), *(torch.as_tensor(dataset[i][0]) for i in picks))


def as_splits(data, *, num_classes=None, classes=None, seed=0, fractions=DEFAULT_FRACTIONS, in_memory_mb=4096,
              num_workers=0, source=None, where="data"):
    """Any data a user has, as the :class:`Splits` the recipe trains on.

    Args:
        data: a :class:`Splits` (returned as it is); a dict with ``"train"`` and optionally ``"val"`` and
            ``"test"``, each an (x, y) pair of tensors, a ``torch.utils.data.Dataset`` of (image, label)
            pairs or a ``DataLoader``; or one Dataset, split here. Missing val / test splits are carved out
            of train by a seeded stratified split with the shares of ``fractions``. Images are float
            (C, H, W) in [0, 1], labels integers in [0, num_classes).
        num_classes: number of classes (default: ``len(classes)``, the Dataset's ``classes`` attribute, or
            1 + the largest training label of data loaded into memory).
        classes: class names (default: the Dataset's ``classes`` attribute, if any).
        seed: seed of the splits made here.
        fractions: (train, val, test) shares.
        in_memory_mb: a Dataset whose images take at most this many MiB as float32 is loaded into memory;
            a larger one is streamed through a DataLoader every epoch (see the module docstring).
        num_workers: DataLoader workers reading a Dataset.
        source: a string identifying the data (default: a hash of its content, or for a streamed data set
            of its size and three samples).
        where: how to name the data in error messages.

    Returns:
        Splits: the three splits, checked against the data contract.

    Raises:
        ValueError: data that breaks the contract, naming the split and what is wrong.
    """
    if isinstance(data, Splits):
        return data
    if isinstance(data, dict):
        unknown = sorted(set(data) - set(FOLDER_SPLITS))
        if unknown or "train" not in data:
            raise ValueError(f"data must map 'train' (and optionally 'val', 'test') to splits, got keys "
                             f"{sorted(data)}")
        parts = dict(data)
    elif isinstance(data, (Dataset, DataLoader)) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")
                                                     and not isinstance(data, (tuple, list))):
        parts = {"train": data}
    else:
        raise ValueError(f"data must be Splits, a dict of splits or a torch.utils.data.Dataset, got "
                         f"{type(data).__name__}")
    base = parts["train"]
    base_dataset = base.dataset if isinstance(base, DataLoader) else base
    if classes is None and not is_tensors(base):
        classes = getattr(base_dataset, "classes", None)
    missing = [name for name in ("val", "test") if parts.get(name) is None]
    if missing:
        if isinstance(base, DataLoader):
            raise ValueError(f"a DataLoader as the training split cannot be split: also give {' and '.join(missing)}")
        shares = [fractions[0]] + [fractions[FOLDER_SPLITS.index(m)] for m in missing]
        if is_tensors(base):
            x, y = base
            pieces = stratified_split(y.numpy(), _fraction_sizes(len(y), shares), seed)
            carved = [(x[torch.from_numpy(i)], y[torch.from_numpy(i)]) for i in pieces]
        else:
            carved = split_dataset(base, shares, seed)
        parts["train"] = carved[0]
        parts.update(zip(missing, carved[1:]))
    parts = {name: _prepare_split(parts[name], f"{where} ({name} split)", in_memory_mb, num_workers)
             for name in FOLDER_SPLITS}
    if num_classes is None:
        if classes is not None:
            num_classes = len(classes)
        elif is_tensors(parts["train"]):
            num_classes = int(parts["train"][1].max()) + 1
        else:
            raise ValueError(f"{where}: pass num_classes= (a streamed data set without a 'classes' attribute)")
    for name in FOLDER_SPLITS:
        if is_tensors(parts[name]):
            parts[name] = _check_tensors(*parts[name], f"{where} ({name} split)", num_classes)
        else:
            loader = parts[name] if isinstance(parts[name], DataLoader) else DataLoader(parts[name], batch_size=8)
            x, y = next(iter(loader))[:2]
            _check_tensors(torch.as_tensor(x), torch.as_tensor(y), f"{where} ({name} split, first batch)",
                           num_classes)
    if source is None:
        joined = "/".join(_split_source(parts[name]) for name in FOLDER_SPLITS)
        source = "custom/" + hashlib.sha256(joined.encode()).hexdigest()[:16]
    return Splits(parts["train"], parts["val"], parts["test"], num_classes,
                  class_names=None if classes is None else tuple(str(c) for c in classes), source=source)


def load_dataset(name, *, data_dir=None, seed=0, val_size=1000, image_size=None, fractions=DEFAULT_FRACTIONS,
                 in_memory_mb=4096, num_workers=0):
    """Loads a data set by name.

    Args:
        name: ``"digits"``, ``"cifar10"``, ``"cifar100"`` or ``"folder"`` (``"custom"`` data is given in
            Python: see :func:`as_splits`).
        data_dir: CIFAR's parent folder (default ``./data``) or the image folder.
        seed: seed of the split.
        val_size: CIFAR validation size.
        image_size: folder images are resized to this size.
        fractions: folder split shares.
        in_memory_mb: folder data up to this size is loaded into memory.
        num_workers: DataLoader workers reading a folder.

    Returns:
        Splits: the data.
    """
    if name == "digits":
        return load_digits(seed)
    if name in CIFAR_FOLDERS:
        return load_cifar(name, data_dir or "data", val_size=val_size, seed=seed)
    if name == "folder":
        if not data_dir:
            raise ValueError("the folder data set needs data_dir (--data-dir PATH)")
        return load_folder(data_dir, image_size=image_size, fractions=fractions, seed=seed, in_memory_mb=in_memory_mb,
                           num_workers=num_workers)
    if name == "custom":
        raise ValueError("the 'custom' data set is given in Python: train(cfg, data=...) with a Dataset, "
                         "a DataLoader or (x, y) tensors")
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def load_for_config(cfg):
    """The data set of a training config (a TrainConfig or anything with its data fields).

    Args:
        cfg: the config (dataset, data_dir, split_seed, image_size, folder_split, in_memory_mb, num_workers).

    Returns:
        Splits: the data, with ``cfg.augment`` applied when it is set.
    """
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.split_seed, image_size=cfg.image_size,
                        fractions=cfg.folder_split, in_memory_mb=cfg.in_memory_mb, num_workers=cfg.num_workers)
    return with_augment(data, cfg.augment)


def with_augment(data, augment):
    """``data`` with its augmentation switched on or off (``augment`` None: unchanged).

    Args:
        data: Splits.
        augment: bool or None.

    Returns:
        Splits: a shallow copy when it changes.
    """
    if augment is None or bool(augment) == data.augment:
        return data
    import dataclasses

    return dataclasses.replace(data, augment=bool(augment))


def balanced_indices(split, n, seed=0):
    """The positions of ``n`` samples of a split in the class proportions of the whole, in increasing order.

    Args:
        split: (x, y) tensors or a Dataset.
        n: samples to keep (all when ``n`` >= the split's size).
        seed: seed of the choice.

    Returns:
        numpy.ndarray: int64 positions in the split.
    """
    size = split_size(split)
    if n >= size:
        return np.arange(size, dtype=np.int64)
    labels = split[1].numpy() if is_tensors(split) else dataset_labels(split)
    return np.sort(stratified_split(labels, [n, size - n], seed)[0]).astype(np.int64)


def balanced_subset(split, n, seed=0):
    """``n`` samples of a split in the class proportions of the whole (as RobustBench's ``n_ex``, but stratified).

    Args:
        split: (x, y) tensors or a Dataset.
        n: samples to keep (all when ``n`` >= the split's size).
        seed: seed of the choice.

    Returns:
        the same kind of split (:func:`balanced_indices` names the samples kept).
    """
    if n >= split_size(split):
        return split
    keep = balanced_indices(split, n, seed)
    if is_tensors(split):
        index = torch.from_numpy(keep)
        return split[0][index], split[1][index]
    return Subset(split, keep.tolist())


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


class StreamLoader:
    """Shuffled batches of a Dataset streamed through a DataLoader, with a generator a checkpoint can save.

    The DataLoader draws each epoch's order (and its workers' seeds) from ``generator``; crop+flip
    augmentation, when on, is drawn from it too. Saving ``generator.get_state()`` makes the batch
    order of a resumed run the one of the uninterrupted run (random transforms inside the Dataset
    are not covered).

    Args:
        dataset: map-style Dataset of (image, label) pairs.
        batch_size: batch size.
        shuffle: reshuffle every epoch.
        seed: seed of the generator.
        augment: apply :func:`crop_flip` to each batch.
        drop_last: drop a final incomplete batch.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, dataset, batch_size, *, shuffle=True, seed=0, augment=False, drop_last=False, num_workers=0):
        self.generator = torch.Generator().manual_seed(seed)
        self.augment = augment
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=self.generator,
                                 drop_last=drop_last, num_workers=num_workers)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            x, y = torch.as_tensor(x), torch.as_tensor(y).to(torch.int64)
            yield (crop_flip(x, self.generator) if self.augment else x), y


class GivenLoader:
    """A DataLoader given by the user as the training split, used as it is (its own batching and shuffling).

    Args:
        loader: the DataLoader.
    """

    def __init__(self, loader):
        self.loader = loader
        # Its own generator when it has one (saved with checkpoints); else torch's global one, saved anyway.
        self.generator = loader.generator if loader.generator is not None else torch.Generator()

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield torch.as_tensor(batch[0]), torch.as_tensor(batch[1]).to(torch.int64)


def stream_loader(split, batch_size, *, seed, augment, drop_last, num_workers=0):
    """The training loader of a split that is not in memory: :class:`StreamLoader` or :class:`GivenLoader`.

    Args:
        split: a Dataset or a DataLoader.
        batch_size: batch size (a DataLoader keeps its own).
        seed: seed of the order.
        augment: crop+flip each batch (a Dataset's loader only).
        drop_last: drop a final incomplete batch.
        num_workers: DataLoader workers.

    Returns:
        an iterable of (x, y) batches with a ``generator`` attribute.
    """
    if isinstance(split, DataLoader):
        return GivenLoader(split)
    return StreamLoader(split, batch_size, seed=seed, augment=augment, drop_last=drop_last, num_workers=num_workers)
