"""The run folder: metrics.json and PNG plots (matplotlib, Agg backend, no display needed)."""

import json
import math
import os

from fastabsld.recipe.checkpoint import atomic_write_text

METRICS_FILE = "metrics.json"


def _finite(value):
    """JSON has no infinities or NaN: they become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_metrics(run_dir, payload, name=METRICS_FILE):
    """Writes ``payload`` as JSON into ``run_dir`` atomically.

    Args:
        run_dir: the run folder.
        payload: JSON-friendly dict (non-finite floats become null).
        name: file name.

    Returns:
        str: the file's path.
    """
    path = os.path.join(run_dir, name)
    atomic_write_text(json.dumps(_finite(payload), indent=1), path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_class(per_class, path, title, ylabel="average", errors=None):
    """Grouped bar chart of per-class accuracies, one group of bars per class and one colour per series.

    Args:
        per_class: dict series name -> list of per-class values.
        path: PNG file to write.
        title: figure title.
        ylabel: y-axis label.
        errors: optional dict series name -> list of per-class error-bar half-widths.

    Returns:
        str: ``path``.
    """
    plt = _pyplot()
    names = list(per_class)
    num_classes = len(per_class[names[0]])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * num_classes), 3.6))
    for i, name in enumerate(names):
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(num_classes)]
        ax.bar(xs, per_class[name], width, label=name, yerr=None if errors is None else errors.get(name), capsize=2)
    ax.set_xticks(range(num_classes))
    ax.set_xlabel("class")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_temperatures(history, path, title):
    """Per-class temperatures over epochs: tau_adv and tau_nat side by side, one line per class.

    Args:
        history: list of epoch entries holding ``epoch``, ``tau_adv`` and ``tau_nat``.
        path: PNG file to write.
        title: figure title.

    Returns:
        str: ``path``, or None when the history holds no temperatures.
    """
    entries = [e for e in history if "tau_adv" in e]
    if not entries:
        return None
    plt = _pyplot()
    epochs = [e["epoch"] for e in entries]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key in zip(axes, ("tau_adv", "tau_nat")):
        values = [e[key] for e in entries]
        for k in range(len(values[0])):
            ax.plot(epochs, [v[k] for v in values], label=str(k))
        ax.set_title(key)
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("temperature")
    axes[1].legend(title="class", fontsize="x-small", ncol=2, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def robust_attack(results):
    """The strongest PGD-style attack present in an evaluation dict (for plots and tables).

    Args:
        results: ``{attack: {...}}`` from ``evaluate``.

    Returns:
        str: the attack's name (``pgd20`` when present).
    """
    for name in ("pgd20", "autoattack", "cw", "fgsm"):
        if name in results:
            return name
    return next(a for a in results if a != "clean")


def plot_run(run_dir, result):
    """Writes the plots of one training run (per-class test robust accuracy; temperatures if any).

    Args:
        run_dir: the run folder.
        result: the dict returned by ``fastabsld.recipe.train.train``.

    Returns:
        list of str: the written files.
    """
    method = result["config"]["method"]
    written = []
    test = result.get("test") or {}
    robust = [a for a in test if a != "clean"]
    if robust:
        attack = robust_attack(test)
        per_class = {f"{method} clean": test["clean"]["per_class"]} if "clean" in test else {}
        per_class[f"{method} {attack}"] = test[attack]["per_class"]
        written.append(plot_per_class(per_class, os.path.join(run_dir, "per_class.png"),
                                      f"per-class test accuracy ({method})"))
    temps = plot_temperatures(result["history"], os.path.join(run_dir, "temperatures.png"),
                              f"class temperatures ({method})")
    return written + ([temps] if temps else [])
