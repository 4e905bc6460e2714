"""Atomic checkpoints, the random-number-generator states a resumed run needs, and models rebuilt from them."""

import os
import random
import tempfile

import numpy as np
import torch

from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.models import build_model

# Version of the checkpoint layout (written into every checkpoint and into the teacher cache's hash).
FORMAT = 1


def atomic_save(obj, path):
    """Writes ``obj`` with ``torch.save`` so that ``path`` is either the old file or the complete new one.

    The data goes to a temporary file in the same folder, is flushed to disk, then renamed over
    ``path`` with ``os.replace`` (atomic on POSIX and Windows). If writing fails, the temporary file
    is removed and ``path`` is untouched.

    Args:
        obj: anything ``torch.save`` accepts.
        path: destination file; its folder is created if needed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(text, path):
    """Writes a text file atomically (temporary file in the same folder, then ``os.replace``).

    Args:
        text: the content.
        path: destination file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rng_state(generators=None):
    """Captures the global RNG states (python, numpy, torch CPU, CUDA if any) and named generators.

    Args:
        generators: optional dict name -> torch.Generator (data order, attack noise...).

    Returns:
        dict: picklable states for :func:`set_rng_state`.
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    return state


def set_rng_state(state, generators=None):
    """Restores states captured by :func:`rng_state`.

    Args:
        state: the dict from :func:`rng_state`.
        generators: dict name -> torch.Generator to restore in place (same names as when captured).
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"checkpoint holds no state for generator {name!r}")
        gen.set_state(state["generators"][name])


def load(path, map_location="cpu"):
    """Loads a checkpoint written by :func:`atomic_save`.

    Args:
        path: the file.
        map_location: passed to ``torch.load``.

    Returns:
        dict: the checkpoint.
    """
    # Checkpoints hold numpy and python RNG states, which the weights-only unpickler refuses.
    return torch.load(path, map_location=map_location, weights_only=False)


def load_model(path, device="cpu"):
    """Rebuilds a model from a ``best.pt`` / ``last.pt`` / cached-teacher checkpoint.

    Args:
        path: the checkpoint.
        device: where to put the model.

    Returns:
        tuple: (model in eval mode, TrainConfig of the run that made it).
    """
    state = load(path, map_location=device)
    cfg = TrainConfig(**state["config"])
    model = build_model(cfg.model, state["num_classes"], state["in_channels"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg
