"""The run folder's metrics.json and plots (written, bounded in size at 10 and 100 classes, saying what they show)."""

import json
import os
import random
import struct

import pytest

from fastabsld.recipe import report


class _Exploding:
    """Pickles part-way, then fails (a full disk or a kill during the write)."""

    def __reduce__(self):
        raise OSError("disk full")


def test_atomic_write_text_failure(tmp_path):
    path = tmp_path / "metrics.json"
    report.write_metrics(str(tmp_path), {"a": 1})
    with pytest.raises(TypeError):
        report.write_metrics(str(tmp_path), {"a": object()})
    assert os.listdir(tmp_path) == ["metrics.json"] and json.loads(path.read_text()) == {"a": 1}
    report.write_metrics(str(tmp_path), {"a": float("inf"), "b": [float("nan"), 1.0]})
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.0]}


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture
def figures(monkeypatch):
    """The texts (title, labels, tick labels, legend entries, notes) of every figure the report saves."""
    import matplotlib.text

    seen = []
    save = report.save_figure

    def keeping(fig, path, caption=None):
        written = save(fig, path, caption)
        texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
        legends = [len(ax.get_legend().get_texts()) for ax in fig.axes if ax.get_legend()]
        seen.append({"path": path, "texts": texts, "legend_entries": legends})
        return written

    monkeypatch.setattr(report, "save_figure", keeping)
    return seen


def _history(num_classes, epochs=6, moving=True, seed=0):
    rng = random.Random(seed)
    history = []
    for e in range(1, epochs + 1):
        entry = {"epoch": e, "train_loss": 2.0 / e, "lr": 0.1 if e < 5 else 0.01, "seconds": 1.0,
                 "val": {"clean": {"average": 0.5 + e / 20, "worst": 0.2 + e / 30, "nsd": 0.3 - e / 50},
                         "pgd20": {"average": 0.3 + e / 20, "worst": 0.1 + e / 30, "nsd": 0.5 - e / 50}}}
        if moving is not None:
            entry["beta"] = 0.1
            entry["tau_adv"] = [1.0 + (rng.uniform(-0.4, 0.4) * e / epochs if moving else 0.0)
                                for _ in range(num_classes)]
            entry["tau_nat"] = list(entry["tau_adv"])
        history.append(entry)
    return history


def _result(method, num_classes, class_names=None, seed=0):
    rng = random.Random(seed)
    robust = [rng.uniform(0.0, 0.7) for _ in range(num_classes)]
    test = {"clean": {"average": 0.8, "worst": 0.5, "nsd": 0.1, "per_class": [min(1.0, r + 0.3) for r in robust]},
            "pgd20": {"average": 0.4, "worst": min(robust), "nsd": 0.3, "per_class": robust}}
    history = _history(num_classes, moving={"absld": True, "rslad": False, "pgd-at": None}[method])
    result = {"config": {"method": method}, "history": history, "best": {"epoch": 5, "value": 0.5}, "test": test}
    if class_names:
        result["class_names"] = class_names
    return result


@pytest.mark.parametrize("num_classes", [10, 100])
def test_run_plots_scale_with_the_number_of_classes(tmp_path, figures, num_classes):
    names = [f"name{k}" for k in range(num_classes)] if num_classes == 100 else None
    result = _result("absld", num_classes, names)
    written = report.plot_run(str(tmp_path), result)
    assert sorted(os.path.basename(p) for p in written) == ["curves.png", "per_class.png", "temperature_accuracy.png",
                                                            "temperatures.png"]
    for path in written:
        width, height = _png_size(path)
        assert width <= report.MAX_WIDTH * report.DPI and height <= 800, (path, width, height)
        assert os.path.getsize(path) < 400_000, path
    per_class = next(f for f in figures if f["path"].endswith("per_class.png"))
    assert "test accuracy of the class" in per_class["texts"] and "average" not in per_class["texts"]
    assert max(per_class["legend_entries"]) <= 3  # series, never one entry per class
    robust = result["test"]["pgd20"]["per_class"]
    order = sorted(range(num_classes), key=lambda k: robust[k])
    label = (lambda k: f"name{k}") if names else str
    text = "\n".join(per_class["texts"])
    for k in order[:5] + order[-5:]:  # the worst and the best classes are named
        assert label(k) in text, k
    temperatures = next(f for f in figures if f["path"].endswith("temperatures.png"))
    assert max(temperatures["legend_entries"]) <= 10
    curves = next(f for f in figures if f["path"].endswith("curves.png"))
    assert {"training loss", "validation accuracy", "validation NSD (lower is fairer)",
            "learning rate and beta"} <= set(curves["texts"])


@pytest.mark.parametrize("method", ["rslad", "pgd-at"])
def test_no_temperature_plot_without_moving_temperatures(tmp_path, method):
    written = report.plot_run(str(tmp_path), _result(method, 10))
    assert sorted(os.path.basename(p) for p in written) == ["curves.png", "per_class.png"]
    assert not os.path.exists(tmp_path / "temperatures.png")


def test_error_bars_are_named_in_the_caption(tmp_path, figures):
    values = {"RSLAD": [0.5] * 12, "ABSLD": [0.6] * 12}
    errors = {"RSLAD": [0.05] * 12, "ABSLD": [0.04] * 12}
    with pytest.raises(ValueError, match="error_label"):
        report.plot_per_class(values, str(tmp_path / "a.png"), "t", errors=errors)
    report.plot_per_class(values, str(tmp_path / "a.png"), "t", ylabel="PGD-20 test accuracy", errors=errors,
                          error_label="error bars: population std over 5 seeds")
    assert "error bars: population std over 5 seeds" in figures[-1]["texts"]
    assert "PGD-20 test accuracy" in figures[-1]["texts"]
