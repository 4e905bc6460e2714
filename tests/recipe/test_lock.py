"""The run folder's lock: a second run in a folder in use is an error naming the holder; every exit releases it."""

import errno
import os
import signal
import socket
import threading
import time

import pytest

from fastabsld.recipe import checkpoint, cli, lock, loop
from fastabsld.recipe import teacher as teacher_mod
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.errors import RunLockedError, WriteError
from fastabsld.recipe.train import train
from tests.recipe import fault_worker

TRAIN = ["train", "--method", "pgd-at", "--epochs", "1", "--train-subset", "64", "--steps", "1", "--test-attacks",
         "clean", "--no-progress"]


def _wait_for(path, process, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.is_alive() and time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.05)


def test_second_run_in_a_folder_in_use_is_an_error_naming_the_holder(tmp_path, forkserver, capsys):
    run_dir = str(tmp_path / "run")
    ready = str(tmp_path / "ready")
    holder = forkserver.Process(target=fault_worker.hold_lock, args=(run_dir, ready))
    holder.start()
    try:
        _wait_for(ready, holder)
        assert lock.holder(run_dir)["pid"] == holder.pid
        assert cli.main([*TRAIN, "--run-dir", run_dir]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        assert f"{run_dir} is in use by process {holder.pid} on " in err
        assert sorted(os.listdir(run_dir)) == ["run.lock"]  # the second run wrote nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    # The holder died without releasing anything: its record is still in run.lock, and it blocks nothing.
    assert str(holder.pid) in open(os.path.join(run_dir, lock.LOCK_FILE)).read()
    assert lock.holder(run_dir) is None
    assert cli.main([*TRAIN, "--run-dir", run_dir]) == 0
    assert "run folder" in capsys.readouterr().out


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_lock_is_released_on_an_exception_and_on_ctrl_c(tmp_path, digits, monkeypatch, error):
    run_dir = str(tmp_path / "run")

    def failing(*args, **kwargs):
        assert lock.holder(run_dir)["pid"] == os.getpid()  # held while the run runs
        raise error("stop")

    monkeypatch.setattr(loop, "train_step", failing)
    with pytest.raises(error):
        train(TrainConfig(method="pgd-at", epochs=1, train_subset=64, steps=1, progress=False), run_dir,
              data=digits, log=lambda *_: None)
    assert lock.holder(run_dir) is None and not lock._held
    with lock.hold(run_dir):  # free again
        pass


def test_lock_is_reentrant_in_one_process_and_exclusive_across_descriptors(tmp_path):
    run_dir = str(tmp_path / "run")
    with lock.hold(run_dir):
        with lock.hold(run_dir):  # the command line holds it, then the epoch loop again
            assert lock.holder(run_dir)["pid"] == os.getpid()
        assert lock.holder(run_dir)["pid"] == os.getpid()  # the inner block did not release the outer one
        import fcntl

        fd = os.open(os.path.join(run_dir, lock.LOCK_FILE), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # what another process meets
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert lock.holder(run_dir) is None


def test_locked_error_message_without_a_record(tmp_path):
    message = str(RunLockedError(str(tmp_path), None))
    assert str(tmp_path) in message and "starting" in message and "\n" not in message


def test_a_second_process_needing_the_same_teacher_waits_for_the_first(tmp_path, forkserver, monkeypatch):
    cfg = TrainConfig(cache_dir=str(tmp_path / "cache"), teacher_model="cnn-s", progress=False)
    path = teacher_mod.teacher_cache_path(cfg)
    run_dir = os.path.splitext(path)[0] + "-run"
    made = str(tmp_path / "made.pt")  # what the first process caches
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": teacher_mod.teacher_config(cfg).to_dict(),
                            "model": fault_worker.fixed_teacher().state_dict(), "num_classes": 10, "in_channels": 1},
                           made)
    ready, release = str(tmp_path / "ready"), str(tmp_path / "release")
    first = forkserver.Process(target=fault_worker.hold_lock, args=(run_dir, ready, release, (made, path)))
    first.start()
    _wait_for(ready, first)

    def no_training(*args, **kwargs):
        raise AssertionError("the teacher was trained twice")

    monkeypatch.setattr(teacher_mod, "fit", no_training)
    lines, got = [], []
    second = threading.Thread(target=lambda: got.append(teacher_mod.get_teacher(cfg, log=lines.append)))
    second.start()
    deadline = time.monotonic() + 60
    while not lines and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines == [f"waiting for process {first.pid} on {socket.gethostname()}, which holds {run_dir}"]
    assert second.is_alive() and not got
    open(release, "w").close()
    second.join(60)
    first.join(60)
    assert got and all(a.equal(b) for a, b in zip(got[0].state_dict().values(),
                                                  fault_worker.fixed_teacher().state_dict().values()))


def test_a_disk_too_full_for_the_lock_record_is_a_write_error_before_anything_runs(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    run_dir = str(tmp_path / "run")
    monkeypatch.setattr(lock.os, "pwrite", full)
    with pytest.raises(WriteError, match=r"run.lock: No space left on device; .* free some space, then resume"):
        with lock.hold(run_dir):
            raise AssertionError("the run started without its lock record")
    monkeypatch.undo()
    with lock.hold(run_dir):  # the failed attempt left the folder free
        assert lock.holder(run_dir)["pid"] == os.getpid()
