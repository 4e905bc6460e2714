"""The run folder: metrics.json and PNG plots (matplotlib, Agg backend, no display needed).

The plots are meant to answer a researcher's questions at any number of classes: which classes are
hard (per-class accuracy sorted, the best and worst classes named), how training went (loss, the
validation average / worst class / NSD, LR and beta), what the temperatures did and how they relate
to the per-class robust accuracy. Figures stay at most ``MAX_WIDTH`` inches (``MAX_WIDTH * DPI``
pixels) wide whatever the number of classes; legends name series, never one entry per class of a
large set; error bars are named in a caption.
"""

import json
import math
import os

from fastabsld.recipe.checkpoint import atomic_write, atomic_write_text

METRICS_FILE = "metrics.json"
DPI = 110
MAX_WIDTH = 12.0  # inches
BAR_LIMIT = 20  # up to this many classes, one bar per class and series, every class named on the axis
LABELLED = 5  # above it, the best and worst this many classes are named
ATTACK_LABELS = {"clean": "clean", "fgsm": "FGSM", "pgd20": "PGD-20", "cw": "CW-inf", "autoattack": "AutoAttack"}


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


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display).

    Returns:
        module: ``matplotlib.pyplot``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def floats(values):
    """Values as floats for plotting, None (an undefined figure read from JSON) as NaN.

    Args:
        values: numbers or None.

    Returns:
        list of float: the values.
    """
    return [math.nan if v is None else float(v) for v in values]


def _names(num_classes, class_names):
    if class_names is None:
        return [str(k) for k in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names must name the {num_classes} classes, got {len(class_names)} names")
    return [str(n) for n in class_names]


def _ranked(values):
    """Class indices from the lowest value to the highest; undefined (NaN) values last."""
    return sorted(range(len(values)), key=lambda k: (math.isnan(values[k]), values[k]))


def _extremes(order, values, labelled):
    """The worst and best ``labelled`` classes of a ranking (defined values only)."""
    defined = [k for k in order if not math.isnan(values[k])]
    if len(defined) <= 2 * labelled:
        return defined
    return defined[:labelled] + defined[-labelled:]


def save_figure(fig, path, caption=None):
    """Writes a figure to a PNG file and closes it.

    Args:
        fig: the matplotlib figure.
        path: PNG file to write.
        caption: a line written under the plot (e.g. what the error bars are), or None.

    Returns:
        str: ``path``.
    """
    plt = pyplot()
    if caption:
        fig.text(0.01, 0.01, caption, fontsize="small", ha="left", va="bottom")
        fig.tight_layout(rect=(0, 0.05, 1, 1))
    else:
        fig.tight_layout()
    try:  # a full disk leaves no empty or partial image behind
        format_ = os.path.splitext(str(path))[1][1:].lower() or "png"
        atomic_write(lambda f: fig.savefig(f, dpi=DPI, format=format_), path)
    finally:
        plt.close(fig)
    return path


def plot_per_class(per_class, path, title, ylabel="accuracy", errors=None, error_label=None, class_names=None,
                   sort_by=None, labelled=LABELLED):
    """Per-class values of one or more series, the classes sorted from the worst to the best.

    Up to ``BAR_LIMIT`` classes: grouped bars, every class named on the axis. Above: one line per
    series over the class ranking (error bands for ``errors``), the ``labelled`` worst and best
    classes named on the plot. The width stays within ``MAX_WIDTH`` inches at any number of classes.

    Args:
        per_class: dict series name -> list of per-class values (None or NaN for an undefined one).
        path: PNG file to write.
        title: figure title.
        ylabel: what the values are (e.g. "PGD-20 test accuracy").
        errors: optional dict series name -> list of per-class error-bar half-widths.
        error_label: the caption that says what the error bars are (e.g. "error bars: std over 5 seeds");
            required with ``errors``.
        class_names: optional names of the classes (default: their indices).
        sort_by: the series that orders the classes (default: the last one).
        labelled: how many worst and best classes to name above ``BAR_LIMIT`` classes.

    Returns:
        str: ``path``.
    """
    if errors and not error_label:
        raise ValueError("error_label must say what the error bars are (e.g. 'error bars: std over 5 seeds')")
    plt = pyplot()
    series = {name: floats(values) for name, values in per_class.items()}
    names = list(series)
    num_classes = len(series[names[0]])
    labels = _names(num_classes, class_names)
    ref = sort_by if sort_by is not None else names[-1]
    order = _ranked(series[ref])
    if num_classes <= BAR_LIMIT:
        width = 0.8 / len(names)
        fig_width = min(MAX_WIDTH, max(6.0, 1.8 + num_classes * (0.25 + 0.15 * len(names))))
        fig, ax = plt.subplots(figsize=(fig_width, 4.0))
        for i, name in enumerate(names):
            xs = [r + (i - (len(names) - 1) / 2) * width for r in range(num_classes)]
            err = None if not errors or name not in errors else [floats(errors[name])[k] for k in order]
            ax.bar(xs, [series[name][k] for k in order], width, label=name, yerr=err, capsize=2)
        ax.set_xticks(range(num_classes))
        long_names = max(len(s) for s in labels) > 3
        ax.set_xticklabels([labels[k] for k in order], rotation=45 if long_names else 0,
                           ha="right" if long_names else "center", fontsize="small")
        ax.set_xlabel(f"class, sorted by {ref} (worst first)")
    else:
        fig, (ax, side) = plt.subplots(1, 2, figsize=(MAX_WIDTH, 4.4), gridspec_kw={"width_ratios": (5, 1)})
        ranks = list(range(num_classes))
        for name in names:
            values = [series[name][k] for k in order]
            line, = ax.plot(ranks, values, marker="o", markersize=2.5, linewidth=1.0, label=name)
            if errors and name in errors:
                err = [floats(errors[name])[k] for k in order]
                ax.fill_between(ranks, [v - e for v, e in zip(values, err)], [v + e for v, e in zip(values, err)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        rank_of = {k: r for r, k in enumerate(order)}
        named = _extremes(order, series[ref], labelled)
        ax.scatter([rank_of[k] for k in named], [series[ref][k] for k in named], s=30, facecolors="none",
                   edgecolors="black", linewidths=0.8, zorder=3, label=f"named on the right ({ref})")
        worst, best = named[:len(named) // 2], named[len(named) // 2:]
        lines = [f"worst {len(worst)} ({ref}):"] + [f"  {labels[k]}  {series[ref][k]:.3f}" for k in worst]
        lines += ["", f"best {len(best)} ({ref}):"] + [f"  {labels[k]}  {series[ref][k]:.3f}" for k in reversed(best)]
        side.axis("off")
        side.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize="small", family="monospace",
                  transform=side.transAxes)
        ax.set_xlabel(f"{num_classes} classes ranked by {ref} (worst first)")
        ax.set_xlim(-1, num_classes)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.08)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, error_label if errors else None)


def _temperature_entries(history):
    """The epochs that hold temperatures, or [] when no temperature ever left its first value (RSLAD, beta = 0)."""
    entries = [e for e in history if e.get("tau_adv")]
    values = {v for e in entries for key in ("tau_adv", "tau_nat") for v in e.get(key) or ()}
    return entries if len(values) > 1 else []


def plot_temperatures(history, path, title, class_names=None, labelled=LABELLED):
    """Per-class temperatures over epochs: tau_adv and tau_nat side by side, one line per class.

    Up to 10 classes every line is coloured and named in the legend; above, all classes are thin grey
    lines and the ``labelled`` classes with the lowest and the highest final temperature are coloured
    and named.

    Args:
        history: list of epoch entries holding ``epoch``, ``tau_adv`` and ``tau_nat``.
        path: PNG file to write.
        title: figure title.
        class_names: optional names of the classes.
        labelled: how many lowest and highest classes to name above 10 classes.

    Returns:
        str: ``path``, or None when the history holds no temperatures or they never moved (RSLAD,
        PGD-AT): a flat plot says nothing.
    """
    entries = _temperature_entries(history)
    if not entries:
        return None
    plt = pyplot()
    epochs = [e["epoch"] for e in entries]
    num_classes = len(entries[0]["tau_adv"])
    labels = _names(num_classes, class_names)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key in zip(axes, ("tau_adv", "tau_nat")):
        values = [floats(e[key]) for e in entries]
        final = values[-1]
        order = _ranked(final)
        named = set(range(num_classes)) if num_classes <= 10 else set(_extremes(order, final, labelled))
        for k in range(num_classes):
            if k not in named:
                ax.plot(epochs, [v[k] for v in values], color="0.75", linewidth=0.6, zorder=1)
        for k in sorted(named, key=lambda c: -final[c]):
            ax.plot(epochs, [v[k] for v in values], linewidth=1.2, label=labels[k], zorder=2)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.legend(title="class" if num_classes <= 10 else f"highest / lowest {labelled}", fontsize="x-small",
                  ncol=2, loc="best")
    axes[0].set_ylabel("temperature")
    fig.suptitle(title)
    return save_figure(fig, path)


def _curve(entries, key):
    return [e["epoch"] for e in entries], [math.nan if e.get(key) is None else e[key] for e in entries]


def plot_curves(history, path, title):
    """Training curves: loss, validation average and worst-class accuracy, validation NSD, LR and beta.

    Args:
        history: the run's epoch entries (``train_loss``, ``lr``, optionally ``beta`` and ``val``).
        path: PNG file to write.
        title: figure title.

    Returns:
        str: ``path``, or None for an empty history.
    """
    if not history:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    (loss_ax, acc_ax), (nsd_ax, lr_ax) = axes
    loss_ax.plot(*_curve(history, "train_loss"), marker=".", color="C0")
    loss_ax.set_title("training loss")
    evaluated = [e for e in history if e.get("val")]
    attacks = list(evaluated[0]["val"]) if evaluated else []
    for i, attack in enumerate(attacks):
        label = ATTACK_LABELS.get(attack, attack)
        epochs = [e["epoch"] for e in evaluated]
        metric = {key: [math.nan if e["val"][attack].get(key) is None else e["val"][attack][key] for e in evaluated]
                  for key in ("average", "worst", "nsd")}
        acc_ax.plot(epochs, metric["average"], marker=".", color=f"C{i}", label=f"{label} average")
        acc_ax.plot(epochs, metric["worst"], marker=".", linestyle="--", color=f"C{i}", label=f"{label} worst class")
        nsd_ax.plot(epochs, metric["nsd"], marker=".", color=f"C{i}", label=label)
    acc_ax.set_title("validation accuracy")
    acc_ax.set_ylim(0, 1.02)
    nsd_ax.set_title("validation NSD (lower is fairer)")
    for ax in (acc_ax, nsd_ax):
        if attacks:
            ax.legend(fontsize="x-small")
        else:
            ax.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax.transAxes)
    lr_ax.plot(*_curve(history, "lr"), color="C0", label="lr")
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_title("learning rate and beta")
    if any(e.get("beta") for e in history):
        beta_ax = lr_ax.twinx()
        beta_ax.plot(*_curve(history, "beta"), color="C1", linestyle="--", label="beta")
        beta_ax.set_ylabel("beta (temperature step)")
        beta_ax.set_yscale("log")
        lr_ax.legend(handles=lr_ax.get_lines() + beta_ax.get_lines(), fontsize="x-small")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_temperature_accuracy(temperatures, accuracy, path, title, ylabel="robust test accuracy", class_names=None,
                              labelled=LABELLED):
    """Each class's temperature against its per-class accuracy (one colour per branch).

    Args:
        temperatures: dict branch name (``tau_adv``, ``tau_nat``) -> list of C temperatures.
        accuracy: list of C per-class accuracies.
        path: PNG file to write.
        title: figure title.
        ylabel: what the accuracy is.
        class_names: optional names of the classes.
        labelled: how many of the worst and best classes to name (all up to ``2 * labelled`` classes).

    Returns:
        str: ``path``.
    """
    plt = pyplot()
    acc = floats(accuracy)
    labels = _names(len(acc), class_names)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, (branch, taus) in enumerate(temperatures.items()):
        taus = floats(taus)
        pairs = [(t, a) for t, a in zip(taus, acc) if not (math.isnan(t) or math.isnan(a))]
        r = _pearson(pairs)
        ax.scatter(taus, acc, s=14, color=f"C{i}", label=f"{branch} (Pearson r = {r:.2f})" if r is not None
                   else branch)
        if i == 0:
            for k in _extremes(_ranked(acc), acc, labelled):
                ax.annotate(labels[k], (taus[k], acc[k]), textcoords="offset points", xytext=(4, 3),
                            fontsize="x-small")
    ax.set_xlabel("class temperature")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _pearson(pairs):
    if len(pairs) < 2:
        return None
    xs, ys = zip(*pairs)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    if sx == 0 or sy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in pairs) / (sx * sy)


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


def _kept(result):
    epoch = (result.get("best") or {}).get("epoch")
    return f"weights of epoch {epoch}, chosen on validation" if epoch else "weights of the last epoch"


def plot_run(run_dir, result):
    """Writes the plots of one training run.

    ``per_class.png`` (per-class test accuracy, clean and robust, sorted), ``curves.png`` (training
    curves) and, when the temperatures moved (ABSLD), ``temperatures.png`` and
    ``temperature_accuracy.png`` (the temperatures of the kept epoch against the per-class robust
    test accuracy).

    Args:
        run_dir: the run folder.
        result: the dict returned by ``fastabsld.recipe.train.train`` (``class_names`` used when present).

    Returns:
        list of str: the written files.
    """
    method = result["config"]["method"]
    names = result.get("class_names")
    history = result["history"]
    written = []
    test = result.get("test") or {}
    robust = [a for a in test if a != "clean"]
    attack = robust_attack(test) if robust else None
    if attack:
        label = ATTACK_LABELS.get(attack, attack)
        per_class = {"clean": test["clean"]["per_class"]} if "clean" in test else {}
        per_class[label] = test[attack]["per_class"]
        written.append(plot_per_class(per_class, os.path.join(run_dir, "per_class.png"),
                                      f"per-class test accuracy ({method}, {_kept(result)})",
                                      ylabel="test accuracy of the class", class_names=names))
    curves = plot_curves(history, os.path.join(run_dir, "curves.png"), f"training curves ({method})")
    written += [curves] if curves else []
    temps = plot_temperatures(history, os.path.join(run_dir, "temperatures.png"), f"class temperatures ({method})",
                              class_names=names)
    if temps:
        written.append(temps)
        if attack:
            # The temperatures that trained the kept (tested) weights: those after the best epoch.
            tempered = [e for e in history if e.get("tau_adv")]
            kept = next((e for e in tempered if e["epoch"] == result["best"]["epoch"]), tempered[-1])
            written.append(plot_temperature_accuracy(
                {"tau_adv": kept["tau_adv"], "tau_nat": kept["tau_nat"]}, test[attack]["per_class"],
                os.path.join(run_dir, "temperature_accuracy.png"),
                f"class temperature (epoch {kept['epoch']}) vs per-class {label} test accuracy ({method})",
                ylabel=f"{label} test accuracy of the class", class_names=names))
    return written
