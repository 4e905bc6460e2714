"""Atomic checkpoint writes and the RNG states a resumed run restores."""

import os
import random

import numpy as np
import pytest
import torch

from fastabsld.recipe import checkpoint


class _Exploding:
    """Pickles part-way, then fails (a full disk or a kill during the write)."""

    def __reduce__(self):
        raise OSError("disk full")


def test_atomic_save_failure_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.atomic_save({"epoch": 1, "w": torch.ones(3)}, str(path))
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"epoch": 2, "w": torch.zeros(1000), "bad": _Exploding()}, str(path))
    assert os.listdir(tmp_path) == ["last.pt"]
    assert checkpoint.load(str(path))["epoch"] == 1


def test_atomic_save_failure_without_previous_file(tmp_path):
    with pytest.raises(OSError):
        checkpoint.atomic_save({"bad": _Exploding()}, str(tmp_path / "sub" / "x.pt"))
    assert os.listdir(tmp_path / "sub") == []


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    state = checkpoint.rng_state({"g": gen})
    draws = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    checkpoint.set_rng_state(state, {"g": gen})
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    assert draws[0] == again[0] and draws[1] == again[1]
    assert torch.equal(draws[2], again[2]) and torch.equal(draws[3], again[3])
    with pytest.raises(KeyError):
        checkpoint.set_rng_state(state, {"other": gen})
