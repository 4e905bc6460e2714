"""The teacher's recipe, its cache key and the cache."""

import dataclasses
import os

import torch

from fastabsld.recipe import teacher as teacher_mod
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.teacher import config_hash, get_teacher, teacher_config


def test_teacher_hash_tracks_recipe():
    cfg = TrainConfig()
    assert config_hash(teacher_config(cfg)) == config_hash(teacher_config(TrainConfig(method="rslad", seed=5)))
    assert config_hash(teacher_config(cfg)) != config_hash(teacher_config(TrainConfig(teacher_epochs=3)))
    assert config_hash(teacher_config(cfg)) == config_hash(teacher_config(TrainConfig(device="cuda", progress=False)))


def test_teacher_is_trained_once_then_cached(tmp_path, digits, monkeypatch):
    cfg = TrainConfig(teacher_epochs=1, cache_dir=str(tmp_path), progress=False,
                      batch_size=128, steps=1)
    first = get_teacher(cfg, data=digits, log=lambda *_: None)
    files = [f for f in os.listdir(tmp_path) if f.endswith(".pt")]
    assert len(files) == 1 and files[0].startswith("teacher-digits-cnn-l-")
    assert not first.training and not any(p.requires_grad for p in first.parameters())

    def no_training(*args, **kwargs):
        raise AssertionError("the cached teacher was retrained")

    monkeypatch.setattr(teacher_mod, "fit", no_training)
    again = get_teacher(dataclasses.replace(cfg, method="rslad", seed=9), data=digits)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
