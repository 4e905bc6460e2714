"""The tables and plots of a study (many runs): what compare and the demo show; a run's own plots are
``fastabsld.recipe.report``'s."""

from fastabsld.recipe import report as run_report


def plot_comparison(summary, attacks, path, title, *, seeds):
    """A comparison of methods: average accuracy, worst-class accuracy and NSD per attack, mean and std over seeds.

    One panel per metric; in each, one group of bars per attack and one bar per method, with error bars.

    Args:
        summary: ``{method: {attack: {metric: {"mean", "std", ...}}}}`` (``fastabsld.study.compare.aggregate``).
        attacks: the attacks, in the order of the groups.
        path: PNG file to write.
        title: figure title.
        seeds: the number of seeds behind each mean (for the caption).

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
            stds = [summary[method][attack][key]["std"] for attack in attacks]
            ax.bar(xs, run_report.floats(means), width, yerr=run_report.floats(stds), capsize=2, label=method)
        ax.set_xticks(range(len(attacks)))
        ax.set_xticklabels([run_report.ATTACK_LABELS.get(a, a) for a in attacks], fontsize="small")
        ax.set_title(label)
        if key != "nsd":
            ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0), title="method")
    fig.suptitle(title)
    return run_report.save_figure(fig, path, f"error bars: population std over {seeds} seed{'s' if seeds != 1 else ''}")
