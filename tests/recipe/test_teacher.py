"""The teacher's recipe, its cache key (teacher-defining fields only) and the cache."""

import contextlib
import dataclasses
import json
import os

import pytest
import torch

from fastabsld.recipe import checkpoint, cli
from fastabsld.recipe import teacher as teacher_mod
from fastabsld.recipe.errors import CheckpointError
from fastabsld.recipe.models import build_model
from fastabsld.recipe.config import RUNTIME_FIELDS, TEACHER_FIELDS, TrainConfig
from fastabsld.recipe.teacher import config_hash, get_teacher, teacher_cache_path, teacher_config
from fastabsld.recipe.train import train
from tests.recipe.conftest import png_folder

# A valid value other than the default for every field of TrainConfig (the test below fails when a field is added
# without being classified here).
OTHER = {
    "method": "rslad", "dataset": "cifar10", "data_dir": "elsewhere", "image_size": 16, "folder_split": (0.6, 0.2, 0.2),
    "augment": True, "in_memory_mb": 10, "num_workers": 2, "model": "cnn-l", "epochs": 3, "batch_size": 64, "lr": 0.05,
    "momentum": 0.5, "weight_decay": 0.0, "milestones": (0.5,), "lr_gamma": 0.5, "eps": 0.2, "alpha": 0.01, "steps": 3,
    "beta": 0.3, "tau_min": 0.2, "tau_max": 4.0, "temperature_mode": "released", "adv_weight": 0.5, "nat_weight": 0.5,
    "eval_every": 5, "val_attacks": ("clean", "fgsm", "pgd20"), "select_metric": "clean.worst",
    "test_attacks": ("clean",), "seed": 7, "split_seed": 3, "train_subset": 100, "teacher_path": "t.pt",
    "teacher_model": "cnn-s", "teacher_epochs": 2, "teacher_seed": 1, "teacher_lr": 0.05, "teacher_batch_size": 64,
    "teacher_momentum": 0.5, "teacher_weight_decay": 0.0, "teacher_milestones": (0.5,), "teacher_lr_gamma": 0.5,
    "device": "cuda", "cache_dir": "other-cache", "progress": False, "sync_bn": True, "amp": True,
    "channels_last": True, "compile": True, "fold_bn": False, "on_nonfinite": "warn", "reweight": True,
    "reweight_beta": 1.0, "reweight_min": 0.5, "reweight_max": 2.0, "trades_beta": 2.0, "ard_temperature": 5.0,
    "ard_alpha": 0.5, "iad_temperature": 2.0, "iad_alpha": 0.5, "iad_beta": 0.5, "iad_warmup": 0.5,
    "teacher_method": "trades",
}
BASE = TrainConfig()


def test_every_field_is_classified():
    assert set(OTHER) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(TEACHER_FIELDS) <= set(OTHER) and set(RUNTIME_FIELDS) <= set(OTHER)


@pytest.mark.parametrize("name", sorted(set(OTHER) - set(TEACHER_FIELDS)))
def test_a_student_only_field_reuses_the_cached_teacher(name):
    changed = TrainConfig(**{name: OTHER[name]})
    assert getattr(changed, name) != getattr(BASE, name)
    assert config_hash(changed) == config_hash(BASE)
    if name != "cache_dir":
        assert teacher_cache_path(changed) == teacher_cache_path(BASE)
    # The teacher's own recipe does not see the field either (besides where and how fast it runs).
    where = RUNTIME_FIELDS + ("sync_bn",)
    assert {k: v for k, v in teacher_config(changed).to_dict().items() if k not in where} == \
        {k: v for k, v in teacher_config(BASE).to_dict().items() if k not in where}


@pytest.mark.parametrize("name", TEACHER_FIELDS)
def test_a_teacher_field_gives_another_teacher(name):
    assert config_hash(TrainConfig(**{name: OTHER[name]})) != config_hash(BASE)


def test_teacher_config_is_pgd_at_with_the_teacher_recipe():
    tcfg = teacher_config(TrainConfig(teacher_epochs=4, teacher_lr=0.02, teacher_batch_size=32, teacher_seed=9,
                                      epochs=50, lr=0.3, seed=2, eval_every=10))
    assert (tcfg.method, tcfg.model, tcfg.epochs, tcfg.lr, tcfg.batch_size, tcfg.seed, tcfg.eval_every) == \
        ("pgd-at", "cnn-l", 4, 0.02, 32, 9, 1)
    assert config_hash(tcfg) == config_hash(TrainConfig(teacher_epochs=4, teacher_lr=0.02, teacher_batch_size=32,
                                                        teacher_seed=9))


def test_a_trades_teacher_is_keyed_by_its_beta_too():
    trades = TrainConfig(teacher_method="trades")
    tcfg = teacher_config(trades)
    assert (tcfg.method, tcfg.trades_beta) == ("trades", trades.trades_beta)
    assert config_hash(tcfg) == config_hash(trades) != config_hash(BASE)
    assert config_hash(dataclasses.replace(trades, trades_beta=2.0)) != config_hash(trades)
    assert config_hash(dataclasses.replace(BASE, trades_beta=2.0)) == config_hash(BASE)  # a PGD-AT teacher


def test_folder_data_is_part_of_the_key(tmp_path):
    png_folder(tmp_path / "a")
    cfg = TrainConfig(dataset="folder", data_dir=str(tmp_path / "a"))
    before = config_hash(cfg)
    assert config_hash(dataclasses.replace(cfg, data_dir=str(tmp_path / "a") + "/")) == before
    (tmp_path / "a" / "cat" / "extra.png").write_bytes((tmp_path / "a" / "cat" / "0.png").read_bytes())
    assert config_hash(cfg) != before  # new content, new teacher


def test_teacher_is_trained_once_then_reused_by_other_student_settings(tmp_path, digits, monkeypatch):
    cfg = TrainConfig(method="rslad", teacher_epochs=1, cache_dir=str(tmp_path), progress=False, batch_size=128,
                      steps=1, epochs=1, train_subset=128, test_attacks=("clean",), val_attacks=("clean",),
                      select_metric="clean.average")
    first = get_teacher(cfg, data=digits, log=lambda *_: None)
    files = [f for f in os.listdir(tmp_path) if f.endswith(".pt")]
    assert len(files) == 1 and files[0].startswith("teacher-digits-cnn-l-")
    assert not first.training and not any(p.requires_grad for p in first.parameters())

    def no_training(*args, **kwargs):
        raise AssertionError("the cached teacher was retrained")

    monkeypatch.setattr(teacher_mod, "fit", no_training)
    again = get_teacher(dataclasses.replace(cfg, method="absld", seed=9), data=digits)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    # A beta sweep and the other temperature mode distil from the same cached teacher (train() says which).
    for changes in ({"method": "absld", "beta": 0.5}, {"method": "absld", "temperature_mode": "released"}):
        run = tmp_path / f"run-{len(os.listdir(tmp_path))}"
        result = train(dataclasses.replace(cfg, **changes), str(run), data=digits, log=lambda *_: None)
        recorded = json.loads((run / "metrics.json").read_text())["teacher"]
        assert recorded == json.loads(json.dumps(result["teacher"]))
        assert recorded["source"] == "cache" and recorded["trained_now"] is False
        assert recorded["path"] == os.path.abspath(tmp_path / files[0]) and recorded["hash"] in files[0]
        assert set(recorded["val"]) == {"clean", "pgd20"} and 0 <= recorded["val"]["pgd20"]["average"] <= 1


def plant_teacher(cfg, path, seed=7):
    """Caches a teacher for ``cfg`` at ``path`` as the recipe does (an untrained cnn-s of ``seed``); returns it."""
    torch.manual_seed(seed)
    model = build_model("cnn-s", 10, 1).eval()
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": teacher_config(cfg).to_dict(), "epoch": 1,
                            "model": model.state_dict(), "num_classes": 10, "in_channels": 1}, str(path))
    return model


def flip_weight_bit(path, model):
    """Flips one bit inside the stored bytes of ``model``'s head weight (torch.load reads the file as before)."""
    data = bytearray(open(path, "rb").read())
    offset = bytes(data).find(model.state_dict()["head.weight"].view(-1).view(torch.uint8).numpy().tobytes())
    assert offset > 0
    data[offset + 9] ^= 0x10
    open(path, "wb").write(bytes(data))


CACHED = dict(method="rslad", teacher_model="cnn-s", progress=False, batch_size=64, steps=1, epochs=1,
              train_subset=64, test_attacks=("clean",), val_attacks=("clean",), select_metric="clean.average")


def test_a_flipped_byte_in_the_cached_teacher_is_an_error_naming_it(tmp_path, digits, monkeypatch):
    cfg = TrainConfig(**CACHED, cache_dir=str(tmp_path))
    path = teacher_cache_path(cfg, digits)
    model = plant_teacher(cfg, path)
    assert torch.equal(get_teacher(cfg, data=digits).head.weight, model.head.weight)
    flip_weight_bit(path, model)

    def no_training(*args, **kwargs):
        raise AssertionError("a damaged cached teacher was trained over or used")

    monkeypatch.setattr(teacher_mod, "fit", no_training)
    with pytest.raises(CheckpointError, match="SHA-256 does not match .* delete it to train the teacher again") \
            as error:
        get_teacher(cfg, data=digits)
    assert str(error.value).startswith(os.path.abspath(path))


def test_the_cli_refuses_a_damaged_cached_teacher_with_one_error_line(tmp_path, digits, capsys):
    argv = ["train", "--method", "rslad", "--teacher-model", "cnn-s", "--epochs", "1", "--train-subset", "64",
            "--steps", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run")]
    cfg = cli.train_config(cli.build_parser().parse_args(argv))
    path = teacher_cache_path(cfg, digits)
    flip_weight_bit(path, plant_teacher(cfg, path))
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {os.path.abspath(path)} is corrupt"), lines
    assert not (tmp_path / "run").exists()


def test_a_process_that_only_waited_for_the_teacher_records_trained_now_false(tmp_path, digits, monkeypatch):
    cfg = TrainConfig(**CACHED, cache_dir=str(tmp_path))
    path = teacher_cache_path(cfg, digits)

    @contextlib.contextmanager
    def another_process_caches_it(run_dir, **kwargs):  # the lock is free once the other process has cached it
        plant_teacher(cfg, path)
        yield

    def no_training(*args, **kwargs):
        raise AssertionError("the waiting process trained the teacher again")

    monkeypatch.setattr(teacher_mod.lock, "hold", another_process_caches_it)
    monkeypatch.setattr(teacher_mod, "fit", no_training)
    _, info = teacher_mod.teacher_and_info(cfg, data=digits, log=lambda *_: None)
    assert info["trained_now"] is False and info["checksum_verified"] is True


def test_a_teacher_trained_here_is_cached_with_its_checksum_and_says_so(tmp_path, digits):
    cfg = TrainConfig(**dict(CACHED, teacher_epochs=1), cache_dir=str(tmp_path))
    _, info = teacher_mod.teacher_and_info(cfg, data=digits, log=lambda *_: None)
    assert info["trained_now"] is True and info["checksum_verified"] is True
    assert checkpoint.verify(teacher_cache_path(cfg, digits)) is True
