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
        ValueError: a name that is not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return device


def seed_everything(seed):
    """Seeds python, numpy and torch (CPU and CUDA).

    Args:
        seed: the seed.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
