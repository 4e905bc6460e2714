"""An image folder's models and threat model follow its image size and the device; long CPU training is announced."""

import json
import logging
import math

import pytest
import torch

from fastabsld.recipe import cli, estimate
from fastabsld.recipe.config import TrainConfig, folder_defaults
from fastabsld.recipe.data import load_digits
from tests.recipe.conftest import png_folder


@pytest.mark.parametrize("side, device, expected", [
    (8, "cpu", ("cnn-s", "cnn-l", 0.1, 0.025)),
    (8, "cuda", ("cnn-s", "cnn-l", 0.1, 0.025)),
    (16, "cuda", ("cnn-s", "cnn-l", 0.1, 0.025)),
    (32, "cpu", ("cnn-s", "cnn-l", 8 / 255, 2 / 255)),
    (32, "cuda", ("resnet18", "wrn-34-10", 8 / 255, 2 / 255)),
    (64, "cuda", ("resnet18", "wrn-34-10", 8 / 255, 2 / 255)),
    (224, "cuda", ("resnet18", "wrn-34-10", 4 / 255, 1 / 255)),
    (224, "cpu", ("cnn-s", "cnn-l", 4 / 255, 1 / 255)),
    (None, "cpu", ("cnn-s", "cnn-l", 8 / 255, 2 / 255)),
])
def test_folder_defaults_by_image_side_and_device(side, device, expected):
    assert folder_defaults(side, device) == expected


def test_a_folder_config_reads_the_image_size(tmp_path):
    png_folder(tmp_path / "tiny", size=(8, 8), per_class=2)
    cfg = TrainConfig(dataset="folder", data_dir=str(tmp_path / "tiny"))
    assert (cfg.model, cfg.teacher_model, cfg.eps, cfg.alpha) == ("cnn-s", "cnn-l", 0.1, 0.025)
    png_folder(tmp_path / "mid", size=(32, 32), per_class=2)
    cfg = TrainConfig(dataset="folder", data_dir=str(tmp_path / "mid"))
    assert (cfg.model, cfg.teacher_model, cfg.eps) == ("cnn-s", "cnn-l", 8 / 255)
    # A resize decides the size; what the user sets wins.
    cfg = TrainConfig(dataset="folder", data_dir=str(tmp_path / "tiny"), image_size=96, eps=0.05,
                      teacher_model="resnet18")
    assert (cfg.model, cfg.teacher_model, cfg.eps, cfg.alpha) == ("cnn-s", "resnet18", 0.05, 1 / 255)
    # CIFAR keeps its recipe whatever the device.
    assert TrainConfig(dataset="cifar10").teacher_model == "wrn-34-10"


def test_train_on_an_8x8_folder_starts_with_a_small_teacher_and_states_eps(tmp_path, caplog):
    png_folder(tmp_path / "images", per_class=12, size=(8, 8))
    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="fastabsld")
    assert cli.main(["train", "--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--method", "rslad",
                     "--batch-size", "8", "--epochs", "1", "--steps", "1", "--teacher-epochs", "1",
                     "--cache-dir", str(tmp_path / "cache"), "--test-attacks", "clean", "--run-dir", str(run),
                     "--no-progress"]) == 0
    err = caplog.text
    assert "3 classes of 3x8x8 images; threat model L-inf eps 0.1 (25.5/255)" in err
    assert "student cnn-s, teacher cnn-l" in err
    assert "training the robust teacher (cnn-l, 1 epochs, 1 PGD steps per batch) on the CPU: about" in err
    config = json.loads((run / "metrics.json").read_text())["config"]
    assert (config["model"], config["teacher_model"], config["eps"]) == ("cnn-s", "cnn-l", 0.1)


def test_the_training_estimate_scales_a_timed_pass(monkeypatch):
    data = load_digits(0)
    monkeypatch.setattr(estimate, "seconds_per_pass", lambda model, images: 0.002)
    cfg = TrainConfig(model="cnn-l", batch_size=100, steps=9, epochs=3)
    batches = math.ceil(data.train[0].shape[0] / 100)
    # 0.002 s per pass of 4 images -> 0.05 s per pass of 100; 10 passes per batch.
    assert estimate.training_seconds(cfg, data) == pytest.approx(0.05 * 10 * batches * 3)


def test_a_long_cpu_training_is_a_warning_naming_faster_choices(monkeypatch):
    data = load_digits(0)
    lines = []
    monkeypatch.setattr(estimate, "seconds_per_pass", lambda model, images: 1.0)
    seconds = estimate.announce_cpu_training(TrainConfig(model="wrn-34-10", epochs=30), data, "the robust teacher",
                                             lines.append)
    assert seconds > estimate.LONG_TRAINING_S and len(lines) == 1
    assert lines[0].startswith("warning: training the robust teacher (wrn-34-10, 30 epochs")
    assert f"about {estimate.describe_seconds(seconds)}" in lines[0] and "--device cuda" in lines[0]


def test_the_estimate_does_not_move_the_random_stream():
    data = load_digits(0)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    estimate.training_seconds(TrainConfig(epochs=1), data)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("seconds, text", [(40, "40 s"), (720, "12 min"), (12600, "3.5 h")])
def test_durations_read_as_people_say_them(seconds, text):
    assert estimate.describe_seconds(seconds) == text
