"""TrainConfig: defaults per data set and validation when built."""

import pytest

from fastabsld.recipe.config import TrainConfig


def test_config_validation_and_defaults():
    cfg = TrainConfig()
    assert (cfg.model, cfg.teacher_model, cfg.eps) == ("cnn-s", "cnn-l", 0.1)
    assert TrainConfig(dataset="cifar10").eps == pytest.approx(8 / 255)
    for bad in ({"method": "mart"}, {"dataset": "mnist"}, {"epochs": 0}, {"select_metric": "cw.average"},
                {"select_metric": "pgd20.best"}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    # Values that would only fail at the first attack step or after training, at the final test.
    for bad in ({"eps": -0.1}, {"eps": float("nan")}, {"alpha": -1.0}, {"alpha": float("inf")}, {"lr": 0.0},
                {"lr": float("nan")}, {"beta": -0.1}, {"test_attacks": ("pgd0",)}, {"test_attacks": ()},
                {"val_attacks": ("clean", "x")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


@pytest.mark.parametrize("value", ["", "  "])
def test_a_blank_cache_environment_variable_counts_as_unset(monkeypatch, value):
    monkeypatch.setenv("FASTABSLD_CACHE", value)
    assert TrainConfig().cache_dir == ".fastabsld_cache"
    monkeypatch.setenv("FASTABSLD_CACHE", "/somewhere/cache")
    assert TrainConfig().cache_dir == "/somewhere/cache"


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_cache_dir_is_a_clear_error(value):
    with pytest.raises(ValueError, match="cache_dir must name a folder"):
        TrainConfig(cache_dir=value)
