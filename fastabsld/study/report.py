"""The tables and plots of a study (many runs): what compare and the demo show; a run's own plots are
``fastabsld.recipe.report``'s."""

import math
import re
import textwrap

from fastabsld.recipe import report as run_report

# (key in the evaluation, column title)
METRICS = (("average", "average"), ("worst", "worst class"), ("nsd", "NSD (lower=fairer)"))
LABEL_WIDTH = 22
CELL_WIDTH = 26


def attack_title(name):
    """An attack's name as tables and plots show it: ``PGD-20``, ``CW-20``, ``FGSM``, ``AutoAttack``.

    Args:
        name: a canonical attack name (``pgd20``, ``cw30``, ``fgsm``, ...).

    Returns:
        str: its title.
    """
    steps = re.fullmatch(r"(pgd|cw)(\d+)", name)
    if steps:
        return f"{steps[1].upper()}-{steps[2]}"
    return run_report.ATTACK_LABELS.get(name, name)


def selection(cfg):
    """How a run's kept weights were chosen, in words (the table says it, so that two studies can be compared).

    Args:
        cfg: the runs' TrainConfig.

    Returns:
        str: e.g. ``"kept weights: best validation pgd20.worst, evaluated every epoch (as train by default)"``.
    """
    from fastabsld.recipe.config import TrainConfig

    every = "every epoch" if cfg.eval_every == 1 else f"every {cfg.eval_every} epochs and after the last"
    same = "as" if cfg.eval_every == TrainConfig().eval_every else "unlike"
    return f"kept weights: best validation {cfg.select_metric}, evaluated {every} ({same} train's default)"


def _number(value, signed=False):
    return "n/a" if value is None or not math.isfinite(value) else (f"{value:+.3f}" if signed else f"{value:.3f}")


def _with_interval(value, interval, signed=False):
    if value is None or not math.isfinite(value):
        return "n/a"
    low, high = interval
    if not (math.isfinite(low) and math.isfinite(high)):
        return _number(value, signed)
    return f"{_number(value, signed)} [{_number(low, signed)}, {_number(high, signed)}]"


def _class_counts_text(class_counts):
    counts = [int(c) for c in class_counts]
    if len(set(counts)) == 1:
        return f"{counts[0]} per class"
    if len(counts) <= 12:
        return "per class " + " ".join(map(str, counts))
    return f"{min(counts)} to {max(counts)} per class"


def _row(label, cells):
    return f"{label:<{LABEL_WIDTH}}" + "".join(f"{cell:<{CELL_WIDTH}}" for cell in cells).rstrip()


def format_table(stats, attacks, reference, seeds, *, class_counts, teacher=None, flags=(), selection=None):
    """The table of a study: per attack, the teacher, each method's mean [interval] and its paired difference.

    Args:
        stats: :func:`fastabsld.study.statistics.summarise`'s result.
        attacks: the attacks, in the order of the blocks.
        reference: the reference method.
        seeds: the seeds.
        class_counts: test images per class.
        teacher: the teacher's test figures ``{attack: {"average", "worst", "nsd"}}`` (its row), or None.
        flags: warning lines on the students (printed under the table).
        selection: how the kept weights were chosen (a line of the heading), or None.

    Returns:
        str: the table, its legend, the verdicts of the strongest attack, the warnings and flags.
    """
    summary = stats["summary"]
    total = int(sum(class_counts))
    level = f"{stats['confidence']:.0%}"
    lines = [f"test split: {total} images ({_class_counts_text(class_counts)}); {len(seeds)} seed"
             f"{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})"]
    if selection:
        lines.append(selection)
    legend = (f"cells: mean over the seeds [{level} interval]; '- {reference}': the paired difference (same seeds, "
              f"same images) [{level} interval] and its verdict: 'better'/'worse' only when significant after Holm's "
              f"correction over the table's {stats['comparisons']} comparisons (family-wise {stats['alpha']:.0%}); "
              f"hierarchical bootstrap of {stats['resamples']} resamples "
              f"({'seeds, then ' if stats['seeds_resampled'] else ''}test images within each class)")
    lines += textwrap.wrap(legend, width=LABEL_WIDTH + CELL_WIDTH * len(METRICS))
    if stats.get("warning"):
        lines.append(f"WARNING: {stats['warning']}")
    order = [reference] + [name for name in summary if name != reference]
    for attack in attacks:
        title = attack_title(attack)
        head = _row(title, [column for _, column in METRICS])
        lines += ["", head, "-" * max(len(head), LABEL_WIDTH + CELL_WIDTH * len(METRICS))]
        if teacher is not None:
            lines.append(_row("teacher", [_number(teacher[attack][key]) for key, _ in METRICS]))
        for name in order:
            cells = summary[name][attack]
            shown = f"{name} (reference)" if name == reference else name
            lines.append(_row(shown, [_with_interval(cells[k]["mean"], cells[k]["interval"]) for k, _ in METRICS]))
            if name != reference:
                lines.append(_row(f"  - {reference}", [_with_interval(cells[k]["diff"], cells[k]["diff_interval"],
                                                                      signed=True) for k, _ in METRICS]))
                lines.append(_row("", [cells[k]["verdict"] for k, _ in METRICS]))
    robust = [a for a in attacks if a != "clean"]
    if robust and len(summary) > 1:
        attack = run_report.robust_attack({a: None for a in robust})
        title = attack_title(attack)
        lines.append("")
        for key, column in METRICS:
            groups = {word: [n for n in order if summary[n][attack][key]["verdict"] == word]
                      for word in ("better", "worse")}
            undecided = [n for n in order if n != reference and summary[n][attack][key]["verdict"] not in groups]
            parts = [f"{word} than {reference}: {', '.join(groups[word])}" for word in groups if groups[word]]
            parts.append(f"no detectable difference from {reference}: {', '.join(undecided) or 'none'}")
            lines.append(f"{title} {column}: " + "; ".join(parts) + ".")
    if flags:
        lines += ["", "flags:"] + [f"  {flag}" for flag in flags]
    return "\n".join(lines)


def plot_comparison(summary, attacks, path, title, *, seeds, confidence=0.95):
    """A comparison of methods: average accuracy, worst-class accuracy and NSD per attack, with the table's intervals.

    One panel per metric; in each, one group of bars per attack and one bar per method (the mean over
    seeds), with the interval of the table drawn as a vertical line (a bias-corrected interval may lie
    beside its mean, which error bars cannot show).

    Args:
        summary: ``{method: {attack: {metric: {"mean", "interval", ...}}}}``
            (:func:`fastabsld.study.statistics.summarise`).
        attacks: the attacks, in the order of the groups.
        path: PNG file to write.
        title: figure title.
        seeds: the number of seeds behind each mean (for the caption).
        confidence: the intervals' level (for the caption).

    Returns:
        str: ``path``.
    """
    plt = run_report.pyplot()
    methods = list(summary)
    panels = (("average", "average accuracy"), ("worst", "worst-class accuracy"), ("nsd", "NSD (lower is fairer)"))
    width = 0.8 / len(methods)
    fig_width = min(run_report.MAX_WIDTH, max(8.0, 2.5 + len(attacks) * len(methods) * 0.35 * len(panels)))
    fig, axes = plt.subplots(1, len(panels), figsize=(fig_width, 4.2))
    for ax, (key, label) in zip(axes, panels):
        for i, method in enumerate(methods):
            xs = [a + (i - (len(methods) - 1) / 2) * width for a in range(len(attacks))]
            means = [summary[method][attack][key]["mean"] for attack in attacks]
            lows, highs = zip(*(summary[method][attack][key]["interval"] for attack in attacks))
            ax.bar(xs, run_report.floats(means), width, label=method)
            ax.vlines(xs, run_report.floats(lows), run_report.floats(highs), color="black", linewidth=1.0)
            ax.scatter(xs + xs, run_report.floats(lows) + run_report.floats(highs), marker="_", color="black",
                       s=40, zorder=3, label="_nolegend_")
        ax.set_xticks(range(len(attacks)))
        ax.set_xticklabels([attack_title(a) for a in attacks], fontsize="small")
        ax.set_title(label)
        if key != "nsd":
            ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0), title="method")
    fig.suptitle(title)
    return run_report.save_figure(fig, path, f"lines: {confidence:.0%} intervals (hierarchical bootstrap over {seeds} "
                                             f"seed{'s' if seeds != 1 else ''} and the test images)")
