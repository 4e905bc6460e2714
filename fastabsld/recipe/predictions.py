"""Per-example evaluation results on disk: ``predictions.npz``, written beside every evaluation.

Each evaluation (the end of ``train``, ``eval``, ``compare``'s added attacks) keeps, per attack,
each test example's predicted class (-1 where the logits were not finite) and whether it was
right, with the labels, the examples' positions in the split and the split's identity. Any table
(accuracies, worst class, NSD, paired differences between two runs, bootstrap intervals, the
sanity checks) can then be recomputed from the file without attacking again, and two files can be
checked to hold the same examples before they are paired.

The file is a numpy ``.npz`` archive (compressed, read with ``allow_pickle=False``):

- ``format``: 0-d int, ``FORMAT``;
- ``identity``: 0-d str, JSON: the data set, split, split seed and size, number of examples, a
  SHA-256 of the labels and positions (``split_hash``), class names and count, eps, alpha and
  threat model, the evaluated checkpoint, the attacks' seed, and the attacks;
- ``labels`` (N,) int64, ``indices`` (N,) int64: each example's label and position in the split;
- ``predicted/<attack>`` (N,) int16 (int32 above 32767 classes) and ``correct/<attack>`` (N,) bool.
"""

import dataclasses
import hashlib
import json
import os
import zipfile

import numpy as np

from fastabsld.recipe.checkpoint import atomic_write

FILE = "predictions.npz"
FORMAT = 1
THREAT_MODEL = "Linf"
# What the identity must name (save adds split_hash, num_examples and attacks).
IDENTITY_KEYS = ("dataset", "split", "split_seed", "split_size", "class_names", "num_classes", "eps", "alpha",
                 "threat_model", "checkpoint", "seed")
_SETTINGS = ("dataset", "split", "split_seed", "split_size", "split_hash", "num_classes", "class_names", "eps",
             "alpha", "threat_model", "seed")


@dataclasses.dataclass(frozen=True)
class Predictions:
    """The content of a predictions file, as plain numpy arrays.

    Attributes:
        labels: (N,) int64 labels.
        indices: (N,) int64 positions of the examples in the split.
        predicted: ``{attack: (N,) int array}``: predicted classes, -1 where the logits were not finite.
        correct: ``{attack: (N,) bool array}``.
        identity: dict: the split's identity and the evaluation's settings (see the module docstring).
    """

    labels: np.ndarray
    indices: np.ndarray
    predicted: dict
    correct: dict
    identity: dict

    @property
    def attacks(self):
        """tuple of str: the attacks, in the order they were evaluated."""
        return tuple(self.predicted)


def split_hash(labels, indices):
    """A SHA-256 (hex) of the examples' labels and positions: equal for two evaluations of the same examples.

    Args:
        labels: (N,) integer labels.
        indices: (N,) positions of the examples in the split.

    Returns:
        str: 64 hex digits.
    """
    digest = hashlib.sha256()
    for values in (labels, indices):
        digest.update(np.ascontiguousarray(values, dtype="<i8").tobytes())
        digest.update(b"/")
    return digest.hexdigest()


def identity(cfg, data, *, split, split_size, checkpoint, eps=None, alpha=None, seed=0):
    """The identity of an evaluation of a run: what :func:`save` records beside the predictions.

    Args:
        cfg: the run's TrainConfig (data set, split seed, eps and alpha).
        data: its Splits (class names and count).
        split: ``"test"``, ``"val"`` or ``"train"``.
        split_size: the number of examples of the whole split (before any subset).
        checkpoint: the evaluated checkpoint (its path, or a description such as ``"final weights"``).
        eps: the attacks' radius (default ``cfg.eps``).
        alpha: their step size (default ``cfg.alpha``).
        seed: the seed of the attacks' random starts.

    Returns:
        dict: the keys of ``IDENTITY_KEYS``.
    """
    return {"dataset": cfg.dataset, "split": split, "split_seed": cfg.split_seed, "split_size": int(split_size),
            "class_names": list(data.class_names) if data.class_names else None, "num_classes": int(data.num_classes),
            "eps": float(cfg.eps if eps is None else eps), "alpha": float(cfg.alpha if alpha is None else alpha),
            "threat_model": THREAT_MODEL, "checkpoint": str(checkpoint), "seed": int(seed)}


def _class_dtype(num_classes):
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def save(path, evaluation, identity, *, indices=None, keep_existing=False):
    """Writes the per-example results of an evaluation to ``path`` (atomically).

    Args:
        path: the file (conventionally ``<run folder>/predictions.npz``).
        evaluation: what :func:`fastabsld.evaluation.evaluate` returned (its ``labels`` and ``predictions``).
        identity: dict with the keys of ``IDENTITY_KEYS`` (see :func:`identity`).
        indices: (N,) positions of the evaluated examples in the split (default: 0 .. N-1, the whole split).
        keep_existing: keep the attacks of an existing file at ``path`` that this evaluation lacks, when that
            file holds the same examples under the same settings (otherwise it is replaced).

    Returns:
        str: ``path``.

    Raises:
        ValueError: an identity lacking a key, or indices that do not match the labels.
    """
    missing = [key for key in IDENTITY_KEYS if key not in identity]
    if missing:
        raise ValueError(f"predictions identity lacks {', '.join(missing)}")
    labels = np.asarray(evaluation.labels, dtype=np.int64)
    indices = np.arange(len(labels), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if indices.shape != labels.shape:
        raise ValueError(f"indices {indices.shape} and labels {labels.shape} must have one entry per example")
    info = {**identity, "num_examples": int(len(labels)), "split_hash": split_hash(labels, indices)}
    predicted = {name: np.asarray(values) for name, values in evaluation.predictions.items()}
    if keep_existing and os.path.exists(path):
        try:
            old = load(path)
        except ValueError:
            old = None  # a damaged file is replaced
        if old is not None and all(old.identity.get(k) == info.get(k) for k in _SETTINGS):
            predicted = {**{a: old.predicted[a] for a in old.attacks if a not in predicted}, **predicted}
    info["attacks"] = list(predicted)
    dtype = _class_dtype(info["num_classes"])
    arrays = {"format": np.array(FORMAT), "identity": np.array(json.dumps(info)), "labels": labels,
              "indices": indices}
    for name, values in predicted.items():
        arrays[f"predicted/{name}"] = values.astype(dtype)
        arrays[f"correct/{name}"] = values == labels
    atomic_write(lambda f: np.savez_compressed(f, **arrays), path)
    return path


def _problem(path, text):
    return ValueError(f"{path}: {text}")


def load(path):
    """Reads and checks a predictions file written by :func:`save`.

    Args:
        path: the file.

    Returns:
        Predictions: plain numpy arrays per attack, the labels, the indices and the identity.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a predictions file, another format, or inconsistent content (shapes, classes out of
            range, ``correct`` disagreeing with the predictions, a split hash that does not match), naming it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise _problem(path, f"is not a readable predictions file ({error})") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _problem(path, "is not a predictions file (a single numpy array, not an .npz archive)")
    try:
        with archive:
            content = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise _problem(path, f"is not a readable predictions file ({error})") from error
    for key in ("format", "identity", "labels", "indices"):
        if key not in content:
            raise _problem(path, f"is not a predictions file: it lacks {key!r}")
    damaged = [key for key, value in content.items() if not isinstance(value, np.ndarray)]
    if damaged:  # NpzFile hands back the raw bytes of a member that is not an array
        raise _problem(path, f"is not a readable predictions file (not arrays: {', '.join(damaged)})")
    if int(content["format"]) != FORMAT:
        raise _problem(path, f"has format {int(content['format'])}; this fastabsld reads format {FORMAT}")
    try:
        info = json.loads(str(content["identity"]))
        attacks = list(info["attacks"])
        num_classes = int(info["num_classes"])
    except (ValueError, KeyError, TypeError) as error:
        raise _problem(path, f"holds an unreadable identity ({error})") from error
    labels, indices = content["labels"], content["indices"]
    n = info.get("num_examples")
    if labels.ndim != 1 or indices.shape != labels.shape or len(labels) != n:
        raise _problem(path, f"holds labels {labels.shape} and indices {indices.shape} for {n} examples")
    if not (np.issubdtype(labels.dtype, np.integer) and np.issubdtype(indices.dtype, np.integer)):
        raise _problem(path, f"holds labels of {labels.dtype} and indices of {indices.dtype}, not integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise _problem(path, f"holds labels outside [0, {num_classes})")
    if split_hash(labels, indices) != info.get("split_hash"):
        raise _problem(path, "holds labels and indices that do not match its split hash (altered or damaged)")
    predicted, correct = {}, {}
    for name in attacks:
        p, c = content.get(f"predicted/{name}"), content.get(f"correct/{name}")
        if p is None or c is None:
            raise _problem(path, f"lacks the results of attack {name!r}")
        if p.shape != labels.shape or c.shape != labels.shape or not np.issubdtype(p.dtype, np.integer) \
                or c.dtype != np.bool_:
            raise _problem(path, f"holds results of attack {name!r} of the wrong shape or type")
        if len(p) and (p.min() < -1 or p.max() >= num_classes):
            raise _problem(path, f"holds predicted classes of attack {name!r} outside [-1, {num_classes})")
        if not np.array_equal(c, p == labels):
            raise _problem(path, f"holds 'correct' flags of attack {name!r} that disagree with its predictions")
        predicted[name], correct[name] = p, c
    return Predictions(labels=labels.astype(np.int64), indices=indices.astype(np.int64), predicted=predicted,
                       correct=correct, identity=info)


def check_same_examples(first, second):
    """Checks that two predictions files hold the same examples under the same settings (before pairing them).

    Args:
        first, second: :class:`Predictions`.

    Raises:
        ValueError: naming the settings that differ.
    """
    differ = [k for k in _SETTINGS if k not in ("seed",) and first.identity.get(k) != second.identity.get(k)]
    if differ:
        raise ValueError("the predictions are not of the same examples and threat model: "
                         + "; ".join(f"{k} {first.identity.get(k)!r} vs {second.identity.get(k)!r}" for k in differ))
