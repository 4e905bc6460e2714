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


def _state():
    torch.manual_seed(0)
    return {"epoch": 3, "w": torch.randn(256, 64), "rng": checkpoint.rng_state()}


def test_checksummed_file_is_still_a_torch_file(tmp_path):
    path = str(tmp_path / "last.pt")
    state = _state()
    checkpoint.atomic_save(state, path)
    loaded, verified = checkpoint.read(path)
    assert verified and torch.equal(loaded["w"], state["w"])
    assert torch.equal(torch.load(path, weights_only=False)["w"], state["w"])  # torch.load ignores the trailer


def _damaged(path, how):
    data = open(path, "rb").read()
    if how == "flipped":
        middle = len(data) // 2
        data = data[:middle] + bytes([data[middle] ^ 0xFF, data[middle + 1] ^ 0x01]) + data[middle + 2:]
    elif how == "truncated":
        data = data[:len(data) // 2]
    elif how == "trailer cut":
        data = data[:-20]
    elif how == "appended":
        data = data + b"x" * 10
    elif how == "empty":
        data = b""
    elif how == "random":
        data = np.random.default_rng(0).bytes(5000)
    elif how == "text":
        data = b"not a checkpoint\n"
    open(path, "wb").write(data)


@pytest.mark.parametrize("how, problem", [
    ("flipped", "is corrupt: its SHA-256 does not match"),
    ("truncated", "is not a fastabsld checkpoint, or is truncated"),
    ("trailer cut", "is damaged: 36 bytes follow its data"), ("appended", "is damaged: 66 bytes follow its data"),
    ("empty", "is empty"), ("random", "is not a fastabsld checkpoint"), ("text", "is not a fastabsld checkpoint")])
def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path, how, problem):
    path = str(tmp_path / "last.pt")
    checkpoint.atomic_save(_state(), path)
    _damaged(path, how)
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load(path)
    message = str(error.value)
    assert message.startswith(f"{path} ") and problem in message and "\n" not in message
    assert error.value.path == path and isinstance(error.value, ValueError)


def test_files_without_a_trailer_load_unverified(tmp_path):
    path = str(tmp_path / "plain.pt")
    torch.save({"w": torch.ones(2)}, path)
    loaded, verified = checkpoint.read(path)
    assert not verified and torch.equal(loaded["w"], torch.ones(2))


def test_keep_previous_and_load_latest_fall_back(tmp_path):
    path = str(tmp_path / "last.pt")
    prev = checkpoint.previous_path(path)
    assert prev == str(tmp_path / "last.prev.pt")
    checkpoint.atomic_save({"epoch": 1}, path, keep_previous=True)
    assert not os.path.exists(prev)  # nothing to keep yet
    checkpoint.atomic_save({"epoch": 2}, path, keep_previous=True)
    checkpoint.atomic_save({"epoch": 3}, path, keep_previous=True)
    assert checkpoint.load(path)["epoch"] == 3 and checkpoint.load(prev)["epoch"] == 2
    state, used, verified, passed = checkpoint.load_latest(path)
    assert (state["epoch"], used, verified, passed) == (3, path, True, [])
    _damaged(path, "flipped")
    state, used, verified, passed = checkpoint.load_latest(path)
    assert state["epoch"] == 2 and used == prev and len(passed) == 1 and "corrupt" in str(passed[0])
    with pytest.raises(checkpoint.CheckpointError) as error:  # the corrupt file and the refused one, both named
        checkpoint.load_latest(path, accept=lambda s: "is too old" if s["epoch"] < 3 else None)
    assert "last.pt and its previous version are unusable" in str(error.value) and "last.prev.pt is too old" in \
        str(error.value)


def test_load_latest_errors_and_absence(tmp_path):
    path = str(tmp_path / "last.pt")
    assert checkpoint.load_latest(path) is None
    checkpoint.atomic_save({"epoch": 1}, path)
    with pytest.raises(checkpoint.CheckpointError, match="is too old"):
        checkpoint.load_latest(path, accept=lambda s: "is too old")
    _damaged(path, "empty")
    checkpoint.atomic_save({"epoch": 0}, checkpoint.previous_path(path))
    _damaged(checkpoint.previous_path(path), "text")
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load_latest(path)
    assert "is empty" in str(error.value) and "last.prev.pt is not a fastabsld checkpoint" in str(error.value)


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".last.pt.0123456789ab.tmp").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("mine")
    assert checkpoint.remove_stale_temporaries(str(tmp_path)) == [".last.pt.0123456789ab.tmp"]
    assert os.listdir(tmp_path) == ["notes.tmp"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_of_a_run_follows_the_umask(tmp_path, digits, umask):
    """Files get 0666 and folders 0777, less the umask (not mkstemp's 0600, which colleagues cannot read)."""
    from fastabsld.recipe import logs
    from fastabsld.recipe.config import TrainConfig
    from fastabsld.recipe.train import train

    old = os.umask(umask)
    try:
        run_dir = tmp_path / "run"
        with logs.setup(str(run_dir / "train.log")):
            train(TrainConfig(method="pgd-at", epochs=2, batch_size=64, train_subset=128, steps=1, progress=False,
                              test_attacks=("clean", "pgd20")), str(run_dir), data=digits)
    finally:
        os.umask(old)
    names = sorted(os.listdir(run_dir))
    assert {"last.pt", "last.prev.pt", "best.pt", "metrics.json", "per_class.png", "curves.png", "run.lock",
            "train.log"} <= set(names)
    for name in names:
        assert os.stat(run_dir / name).st_mode & 0o777 == 0o666 & ~umask, name
    assert os.stat(run_dir).st_mode & 0o777 == 0o777 & ~umask
