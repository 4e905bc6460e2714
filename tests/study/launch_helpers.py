"""Helpers of the launcher tests: a tiny compare budget on digits, a teacher cache holding its teacher, run equality."""

import json
import os

import torch

from fastabsld.recipe import checkpoint
from fastabsld.recipe import teacher as teacher_mod
from fastabsld.recipe.config import TrainConfig
from fastabsld.study import compare as compare_mod
from tests.recipe import fault_worker

# Two epochs of two batches, validated on clean accuracy, and a small teacher: seconds per run.
TINY = dict(epochs=2, batch_size=64, steps=1, train_subset=128, eval_every=1, val_attacks=("clean",),
            select_metric="clean.average", progress=False, teacher_model="cnn-s")


def cache_fixed_teacher(cache_dir, config=TINY):
    """Writes the fixed (untrained) teacher of ``config`` into ``cache_dir``, so that no teacher trains.

    Args:
        cache_dir: the teacher cache folder.
        config: the study's settings (over compare's defaults).

    Returns:
        dict: ``config`` with ``cache_dir``.
    """
    cfg = TrainConfig(**{**compare_mod.DEFAULTS, **config}, cache_dir=str(cache_dir))
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": teacher_mod.teacher_config(cfg).to_dict(),
                            "epoch": 1, "model": fault_worker.fixed_teacher().state_dict(), "num_classes": 10,
                            "in_channels": 1}, teacher_mod.teacher_cache_path(cfg))
    return dict(config, cache_dir=str(cache_dir))


def final_weights(run_dir):
    """The model weights in a run folder's last.pt."""
    return checkpoint.load(os.path.join(run_dir, "last.pt"))["model"]


def assert_same_runs(result_a, result_b, out_a, out_b):
    """Two compare results hold the same per-run test figures and their runs end with identical weights."""
    assert result_a["runs"].keys() == result_b["runs"].keys()
    for name, per_seed in result_a["runs"].items():  # through JSON: an undefined figure (NaN) equals itself
        assert json.dumps(per_seed, sort_keys=True) == json.dumps(result_b["runs"][name], sort_keys=True), name
    for folder in os.listdir(out_a):
        if os.path.isfile(os.path.join(out_a, folder, "last.pt")):
            a, b = final_weights(os.path.join(out_a, folder)), final_weights(os.path.join(out_b, folder))
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), f"{folder}: {key}"
