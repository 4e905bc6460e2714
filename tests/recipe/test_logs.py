"""What a run tells: one plain line per epoch, bars only on a terminal, a log file, TensorBoard scalars."""

import io
import logging
import os
import re
import subprocess
import sys

import pytest

from fastabsld.recipe import logs
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.models import build_model
from fastabsld.recipe.train import train

EPOCH_LINE = re.compile(r"^(\S+) epoch (\d+)/(\d+)  loss (\S+)  lr (\S+)")


def test_redirected_training_prints_one_readable_line_per_epoch_and_no_bar(tmp_path):
    """``fastabsld train > log 2>&1`` (progress bars asked for, but no terminal): lines, no carriage returns."""
    log_file = tmp_path / "logs" / "train.log"
    argv = [sys.executable, "-m", "fastabsld", "train", "--method", "pgd-at", "--epochs", "3", "--train-subset", "64",
            "--steps", "1", "--test-attacks", "clean", "--run-dir", str(tmp_path / "run"), "--threads", "1",
            "--log-file", str(log_file)]
    with open(tmp_path / "out.log", "wb") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=300,
                              cwd=tmp_path)
    text = (tmp_path / "out.log").read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "it/s" not in text and "%|" not in text
    lines = text.splitlines()
    epochs = [m for m in map(EPOCH_LINE.match, lines) if m]
    assert [(m[1], m[2], m[3]) for m in epochs] == [("pgd-at", str(k), "3") for k in (1, 2, 3)]
    for line in lines:
        if EPOCH_LINE.match(line):
            assert "val clean avg " in line and " worst " in line and " nsd " in line and line.endswith(" s")
    assert any(line.startswith("clean ") for line in lines) and "run folder" in text
    # The log file holds the same lines, time-stamped, and the summary.
    logged = [line for line in log_file.read_text().splitlines() if " epoch " in line]
    assert all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in logged)
    assert [line[20:] for line in logged] == [m.string for m in epochs] + [
        line for line in lines if line.startswith("best epoch on validation")]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal_and_never_with_no_progress(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert logs.show_progress(True) and not logs.show_progress(False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not logs.show_progress(True)


def test_epoch_line_says_what_the_epoch_did():
    entry = {"epoch": 3, "train_loss": 0.12345, "lr": 0.1, "beta": 0.01, "seconds": 12.34,
             "val": {"clean": {"average": 0.9123, "worst": 0.8, "nsd": 0.05},
                     "pgd20": {"average": 0.6, "worst": float("nan"), "nsd": None}},
             "tau_adv": [0.8, 1.25, 1.0], "tau_nat": [1.0, 1.0, 1.0]}
    line = logs.epoch_line(entry, epochs=30, method="absld", best=True)
    assert line == ("absld epoch 3/30  loss 0.1235  lr 0.1  beta 0.01  val clean avg 0.912 worst 0.800 nsd 0.050  "
                    "val pgd20 avg 0.600 worst n/a nsd n/a (best)  tau_adv 0.8..1.25  tau_nat 1..1  12.3 s")
    rslad = logs.epoch_line({"epoch": 1, "train_loss": 0.5, "lr": 0.1, "beta": 0.0, "tau_adv": [1.0, 1.0],
                             "tau_nat": [1.0, 1.0]}, epochs=2, method="rslad")
    assert rslad == "rslad epoch 1/2  loss 0.5000  lr 0.1"  # temperatures that cannot move are left out
    nan = logs.epoch_line({"epoch": 1, "train_loss": None, "lr": 0.1, "nonfinite_batches": 2}, epochs=2,
                          method="pgd-at")
    assert nan == "pgd-at epoch 1/2  loss n/a  lr 0.1  non-finite loss in 2 batches"


def test_log_file_and_handlers_are_removed_afterwards(tmp_path, capsys):
    path = tmp_path / "a.log"
    before = list(logs.logger().handlers)
    with logs.setup(str(path)):
        logs.info("hello")
        logs.error("error: bad")
    assert logs.logger().handlers == before
    out = capsys.readouterr()
    assert out.out == "hello\n" and out.err == "error: bad\n"
    assert [line[20:] for line in path.read_text().splitlines()] == ["hello", "error: bad"]


def test_unconfigured_logging_prints(capsys, monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    logs.info("plain")
    assert capsys.readouterr().out == "plain\n"


class _FakeWriter:
    def __init__(self):
        self.scalars, self.flushes = [], 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushes += 1

    def close(self):
        raise AssertionError("an injected writer belongs to the caller")


def _teacher():
    import torch

    torch.manual_seed(3)
    return build_model("cnn-s", 10, 1).eval()


TINY = dict(method="absld", epochs=2, batch_size=64, steps=1, train_subset=128, progress=False,
            test_attacks=("clean",))


def test_scalars_reach_an_injected_writer(tmp_path, digits):
    writer = _FakeWriter()
    result = train(TrainConfig(**TINY), str(tmp_path), teacher=_teacher(), data=digits, log=lambda *_: None,
                   scalar_writer=writer)
    by_step = {}
    for tag, value, step in writer.scalars:
        by_step.setdefault(step, {})[tag] = value
    for entry in result["history"]:
        got = by_step[entry["epoch"]]
        assert got["train/loss"] == entry["train_loss"] and got["train/lr"] == entry["lr"]
        assert got["train/beta"] == entry["beta"]
        assert got["val/pgd20/worst"] == entry["val"]["pgd20"]["worst"]
        assert got["temperature/adv_min"] == min(entry["tau_adv"])
        assert got["time/epoch_seconds"] == entry["seconds"]
    assert by_step[2]["test/clean/average"] == result["test"]["clean"]["average"]
    assert writer.flushes == 3  # after each epoch and after the test


def test_real_tensorboard_writer(tmp_path, digits):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed: the real SummaryWriter "
                                              "path is untested here (an injected writer is tested above)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(TrainConfig(**TINY), str(tmp_path), teacher=_teacher(), data=digits, log=lambda *_: None)
    events = [n for n in os.listdir(tmp_path) if n.startswith("events.out.tfevents")]
    assert len(events) == 1
    scalars = EventAccumulator(str(tmp_path)).Reload()
    loss = [(e.step, e.value) for e in scalars.Scalars("train/loss")]
    assert loss == [(e["epoch"], pytest.approx(e["train_loss"], rel=1e-6)) for e in result["history"]]
    assert scalars.Scalars("test/clean/average")[0].value == pytest.approx(result["test"]["clean"]["average"])
