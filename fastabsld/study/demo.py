"""The main job: RSLAD against ABSLD on the digits set, on a CPU, with several seeds.

One robust teacher (PGD-AT, cached) distils the same student architecture with RSLAD and with
ABSLD under the same budget (epochs, batch size, threat model) and the same seeds; both are
evaluated on the test split. The table reports each metric as mean +- population std over the
seeds and the paired ABSLD - RSLAD difference, and says plainly whether ABSLD improved the
worst-class robust accuracy and the NSD beyond the seed spread.
"""

import dataclasses
import os
import statistics
import time

from fastabsld.recipe import logs, report
from fastabsld.recipe.config import DEFAULT_TEACHER_EPOCHS, TrainConfig
from fastabsld.recipe.data import load_dataset
from fastabsld.recipe.teacher import teacher_and_info, teacher_cache_path
from fastabsld.recipe.train import teacher_report, train

METHODS = ("rslad", "absld")
ATTACK = "pgd20"
# (label, attack, key, higher is better)
ROWS = (("clean accuracy (avg)", "clean", "average", True),
        ("PGD-20 accuracy (avg)", ATTACK, "average", True),
        ("PGD-20 worst-class acc.", ATTACK, "worst", True),
        ("PGD-20 NSD (lower=fairer)", ATTACK, "nsd", False))


def mean_std(values):
    """The mean and the population standard deviation of per-seed values (std 0 for one value).

    Args:
        values: the values (one per seed).

    Returns:
        tuple: (mean, std).
    """
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def verdict(rslad, absld, higher_is_better):
    """Whether ABSLD beat RSLAD on one metric, judged against the spread across seeds.

    The paired mean difference counts only when its size exceeds the larger of the two methods'
    standard deviations over seeds; otherwise the difference is reported as inside the noise.

    Args:
        rslad: per-seed values of RSLAD.
        absld: per-seed values of ABSLD (same seeds, same order).
        higher_is_better: direction of the metric.

    Returns:
        tuple: (word, mean difference absld - rslad) with word ``"better"``, ``"worse"`` or ``"within noise"``.
    """
    diff = statistics.fmean(a - r for a, r in zip(absld, rslad))
    spread = max(mean_std(rslad)[1], mean_std(absld)[1])
    if len(rslad) < 2 or abs(diff) <= spread:
        return "within noise", diff
    return ("better" if (diff > 0) == higher_is_better else "worse"), diff


def format_table(results, seeds):
    """The side-by-side table of the demo.

    Args:
        results: dict method -> list (per seed) of test evaluations ``{attack: {...}}``.
        seeds: the seeds, in the order of the lists.

    Returns:
        str: the table and the verdict lines.
    """
    head = (f"{'test split, ' + str(len(seeds)) + ' seeds':<27} {'RSLAD':>15} {'ABSLD':>15} "
            f"{'ABSLD-RSLAD (paired)':>20}  verdict")
    lines = [head, "-" * len(head)]
    verdicts = {}
    for label, attack, key, higher in ROWS:
        cols = []
        for method in METHODS:
            mean, std = mean_std([r[attack][key] for r in results[method]])
            cols.append(f"{mean:.3f} +- {std:.3f}")
        rslad, absld = ([r[attack][key] for r in results[m]] for m in METHODS)
        word, diff = verdict(rslad, absld, higher)
        paired_std = mean_std([a - r for a, r in zip(absld, rslad)])[1]
        verdicts[key if attack == ATTACK else "clean"] = word
        lines.append(f"{label:<27} {cols[0]:>15} {cols[1]:>15} {f'{diff:+.3f} +- {paired_std:.3f}':>20}  {word}")
    lines.append("")
    lines.append(_sentence("worst-class robust accuracy", verdicts["worst"]))
    lines.append(_sentence("robust fairness (NSD)", verdicts["nsd"]))
    lines.append("(a difference counts only when it exceeds the larger std over seeds; mean +- population std)")
    return "\n".join(lines)


def _sentence(what, word):
    if word == "better":
        return f"ABSLD improved {what} over RSLAD beyond the seed spread."
    if word == "worse":
        return f"ABSLD did NOT improve {what}: it was worse than RSLAD beyond the seed spread."
    return f"ABSLD did NOT clearly improve {what} over RSLAD: the difference is inside the seed spread."


def run_demo(out_dir="runs/demo", *, seeds=(0, 1, 2, 3, 4), epochs=30, teacher_epochs=DEFAULT_TEACHER_EPOCHS,
             cache_dir=None, device="cpu", progress=True, log=None, speed=None):
    """Trains the teacher (or reuses the cached one), distils RSLAD and ABSLD students, prints the table.

    Args:
        out_dir: folder of the report (one run folder per method and seed, demo.json, PNG plots).
        seeds: student seeds (the same for both methods).
        epochs: student epochs.
        teacher_epochs: PGD-AT epochs of the teacher (when not cached).
        cache_dir: teacher cache folder (``None``: the TrainConfig default).
        device: device name.
        progress: progress bars.
        log: function printing lines (default: :func:`fastabsld.recipe.logs.info`).
        speed: TrainConfig speed options (``amp``, ``channels_last``, ``compile``, ``fold_bn``), or None.

    Returns:
        dict: the demo's summary (also written to ``out_dir/demo.json``).
    """
    log = log or logs.info
    began = time.perf_counter()
    base = TrainConfig(method="absld", dataset="digits", epochs=epochs, teacher_epochs=teacher_epochs, device=device,
                       eval_every=5, progress=progress, test_attacks=("clean", "fgsm", ATTACK),
                       **({"cache_dir": cache_dir} if cache_dir else {}), **(speed or {}))
    data = load_dataset("digits", seed=base.split_seed)
    cached = os.path.exists(teacher_cache_path(base))
    teacher, teacher_info = teacher_and_info(base, data=data, log=log)
    teacher_info["val"] = teacher_report(teacher, data, base)
    log(f"teacher: {base.teacher_model}, {'reused from' if cached else 'trained and cached at'} "
        f"{teacher_cache_path(base)} ({time.perf_counter() - began:.0f} s); validation clean "
        f"{teacher_info['val']['clean']['average']:.3f}, PGD-20 {teacher_info['val']['pgd20']['average']:.3f}")
    log(f"students: {base.model}, {epochs} epochs, eps={base.eps}, alpha={base.alpha}, {base.steps} PGD steps, "
        f"seeds {list(seeds)}; test split {len(data.test[1])} images, checkpoint chosen on {len(data.val[1])} "
        "validation images")
    results = {m: [] for m in METHODS}
    histories = {m: [] for m in METHODS}
    for seed in seeds:
        for method in METHODS:
            t = time.perf_counter()
            cfg = dataclasses.replace(base, method=method, seed=seed)
            result = train(cfg, os.path.join(out_dir, f"{method}-seed{seed}"), teacher=teacher, data=data, log=log,
                           teacher_info=teacher_info)
            results[method].append(result["test"])
            histories[method].append(result["history"])
            test = result["test"][ATTACK]
            log(f"  {method} seed {seed}: PGD-20 avg {test['average']:.3f}, worst {test['worst']:.3f}, "
                f"NSD {test['nsd']:.3f} ({time.perf_counter() - t:.0f} s)")
    table = format_table(results, list(seeds))
    plots = [
        report.plot_per_class(
            {m.upper(): [statistics.fmean(r[ATTACK]["per_class"][k] for r in results[m])
                         for k in range(len(results[m][0][ATTACK]["per_class"]))] for m in METHODS},
            os.path.join(out_dir, "per_class_robust_accuracy.png"),
            f"per-class PGD-20 test accuracy, mean over {len(seeds)} seeds",
            ylabel="PGD-20 test accuracy of the class", sort_by="RSLAD",
            errors={m.upper(): [mean_std([r[ATTACK]["per_class"][k] for r in results[m]])[1]
                                for k in range(len(results[m][0][ATTACK]["per_class"]))] for m in METHODS},
            error_label=f"error bars: population std over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"),
        report.plot_temperatures(histories["absld"][0], os.path.join(out_dir, "absld_temperatures.png"),
                                 f"ABSLD class temperatures (seed {seeds[0]})"),
    ]
    summary = {"seeds": list(seeds), "config": base.to_dict(), "teacher": teacher_info, "results": results,
               "table": table,
               "seconds": time.perf_counter() - began}
    report.write_metrics(out_dir, summary, name="demo.json")
    log("")
    log(table)
    log("")
    log(f"report: {os.path.join(out_dir, 'demo.json')}; plots: {', '.join(p for p in plots if p)}; "
        f"per-run folders under {out_dir}; total {summary['seconds']:.0f} s")
    return summary
