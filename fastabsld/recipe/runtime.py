"""Where and how reproducibly a run executes: the device and the seeds."""

import random

import numpy as np
import torch


def resolve_device(name):
    """``"auto"`` -> CUDA when available, else the CPU; other names pass through.

    Args:
        name: device name.

    Returns:
        torch.device: the device.

    Raises:
        ValueError: a name that is not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, or a CUDA device that is not
            there.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"device {name!r}: CUDA is not available here (torch {torch.__version__} is {build} and "
                             "sees no GPU); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def seed_everything(seed):
    """Seeds python, numpy and torch (CPU and CUDA).

    Args:
        seed: the seed.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
