"""The main job: RSLAD against ABSLD on the digits set, on a CPU, with several seeds.

One robust teacher (PGD-AT, cached) distils the same student architecture with RSLAD and with
ABSLD under the same budget (epochs, batch size, threat model) and the same seeds; both are
evaluated on the test split, and so is the teacher. The table (:func:`fastabsld.study.report.format_table`)
gives each metric as the mean over seeds with a 95% interval and the paired ABSLD - RSLAD difference
(same seeds, same test images) with its interval and a verdict that survives Holm's correction
(:mod:`fastabsld.study.statistics`), and says plainly whether ABSLD improved the worst-class robust
accuracy and the NSD. Weights are selected on validation every epoch, as ``train`` does by default.
"""

import dataclasses
import os
import statistics as stats_lib
import time

from fastabsld.recipe import logs, report
from fastabsld.recipe.config import DEFAULT_TEACHER_EPOCHS, TrainConfig
from fastabsld.recipe.data import load_dataset
from fastabsld.recipe.teacher import teacher_and_info, teacher_cache_path
from fastabsld.recipe.train import teacher_report, train
from fastabsld.study import compare, statistics
from fastabsld.study import report as study_report

METHODS = ("rslad", "absld")
REFERENCE = "rslad"
ATTACK = "pgd20"
ATTACKS = ("clean", "fgsm", ATTACK)


def verdict_lines(summary):
    """The demo's two sentences: did ABSLD improve PGD-20 worst-class accuracy and NSD over RSLAD?

    Args:
        summary: :func:`fastabsld.study.statistics.summarise`'s ``summary`` with RSLAD as the reference.

    Returns:
        list of str: one sentence per question.
    """
    lines = []
    for key, what in (("worst", "worst-class robust accuracy"), ("nsd", "robust fairness (NSD)")):
        cell = summary["absld"][ATTACK][key]
        low, high = cell["diff_interval"]
        shown = f"ABSLD - RSLAD {cell['diff']:+.3f}, 95% interval [{low:+.3f}, {high:+.3f}]"
        if cell["verdict"] == "better":
            lines.append(f"ABSLD improved {what} over RSLAD ({shown}; significant after Holm's correction).")
        elif cell["verdict"] == "worse":
            lines.append(f"ABSLD did NOT improve {what}: it was worse than RSLAD ({shown}; significant after "
                         "Holm's correction).")
        else:
            lines.append(f"ABSLD did NOT detectably improve {what} over RSLAD ({shown}): {cell['verdict']}.")
    return lines


def run_demo(out_dir="runs/demo", *, seeds=(0, 1, 2, 3, 4), epochs=30, teacher_epochs=DEFAULT_TEACHER_EPOCHS,
             cache_dir=None, device="cpu", progress=True, log=None, speed=None):
    """Trains the teacher (or reuses the cached one), distils RSLAD and ABSLD students, prints the table.

    Args:
        out_dir: folder of the report (one run folder per method and seed, demo.json, PNG plots).
        seeds: student seeds (the same for both methods; distinct).
        epochs: student epochs.
        teacher_epochs: PGD-AT epochs of the teacher (when not cached).
        cache_dir: teacher cache folder (``None``: the TrainConfig default).
        device: device name.
        progress: progress bars.
        log: function printing lines (default: :func:`fastabsld.recipe.logs.info`).
        speed: TrainConfig speed options (``amp``, ``channels_last``, ``compile``, ``fold_bn``), or None.

    Returns:
        dict: the demo's summary (also written to ``out_dir/demo.json``): ``seeds``, ``config``, ``teacher``,
        ``teacher_test``, ``results`` (per method, the per-seed test figures), ``summary`` and ``statistics``
        (see :func:`fastabsld.study.statistics.summarise`), ``flags``, ``table``, ``plots``, ``seconds``.

    Raises:
        ValueError: no seed or a repeated seed (before anything trains).
    """
    log = log or logs.info
    began = time.perf_counter()
    seeds = statistics.check_seeds(seeds)
    base = TrainConfig(method="absld", dataset="digits", epochs=epochs, teacher_epochs=teacher_epochs, device=device,
                       progress=progress, test_attacks=ATTACKS,
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
    per_example, kept = {}, {m: [] for m in METHODS}
    for seed in seeds:
        for method in METHODS:
            t = time.perf_counter()
            cfg = dataclasses.replace(base, method=method, seed=seed)
            run_dir = os.path.join(out_dir, f"{method}-seed{seed}")
            result = train(cfg, run_dir, teacher=teacher, data=data, log=log, teacher_info=teacher_info)
            results[method].append(result["test"])
            histories[method].append(result["history"])
            kept[method].append(result["best"]["epoch"])
            figures, per_example[(method, seed)] = compare.run_results(run_dir, result["test"], ATTACKS, data,
                                                                       teacher_device(teacher))
            test = figures[ATTACK]
            log(f"  {method} seed {seed}: PGD-20 avg {test['average']:.3f}, worst {test['worst']:.3f}, "
                f"NSD {test['nsd']:.3f} ({time.perf_counter() - t:.0f} s)")
    study = compare.study_of(per_example, list(METHODS), seeds, ATTACKS, data.num_classes)
    outcome = statistics.summarise(study, REFERENCE)
    teacher_figures = compare.teacher_test(out_dir, teacher, teacher_info, ATTACKS, data, base,
                                           teacher_device(teacher))
    flags = compare.student_flags(outcome["summary"], kept, epochs, teacher_figures)
    table = "\n".join([study_report.format_table(outcome, ATTACKS, REFERENCE, seeds, class_counts=study.class_counts,
                                                 teacher=teacher_figures, flags=flags,
                                                 selection=study_report.selection(base)), ""]
                      + verdict_lines(outcome["summary"]))
    num_classes = len(results["rslad"][0][ATTACK]["per_class"])
    plots = [
        study_report.plot_comparison(outcome["summary"], ATTACKS, os.path.join(out_dir, "demo.png"),
                                     f"RSLAD vs ABSLD on digits: {len(seeds)} seeds ({epochs} epochs)",
                                     seeds=len(seeds), confidence=outcome["confidence"]),
        report.plot_per_class(
            {m.upper(): [stats_lib.fmean(r[ATTACK]["per_class"][k] for r in results[m]) for k in range(num_classes)]
             for m in METHODS},
            os.path.join(out_dir, "per_class_robust_accuracy.png"),
            f"per-class PGD-20 test accuracy, mean over {len(seeds)} seeds",
            ylabel="PGD-20 test accuracy of the class", sort_by="RSLAD",
            errors={m.upper(): [stats_lib.pstdev([r[ATTACK]["per_class"][k] for r in results[m]])
                                for k in range(num_classes)] for m in METHODS} if len(seeds) > 1 else None,
            error_label=f"error bars: population std over {len(seeds)} seeds"),
        report.plot_temperatures(histories["absld"][0], os.path.join(out_dir, "absld_temperatures.png"),
                                 f"ABSLD class temperatures (seed {seeds[0]})"),
    ]
    summary = {"seeds": seeds, "config": base.to_dict(), "teacher": teacher_info, "teacher_test": teacher_figures,
               "results": results, "class_counts": study.class_counts.tolist(), "summary": outcome["summary"],
               "statistics": {k: v for k, v in outcome.items() if k != "summary"}, "flags": flags, "table": table,
               "plots": [p for p in plots if p], "seconds": time.perf_counter() - began}
    report.write_metrics(out_dir, summary, name="demo.json")
    log("")
    log(table)
    log("")
    log(f"report: {os.path.join(out_dir, 'demo.json')}; plots: {', '.join(p for p in plots if p)}; "
        f"per-run folders under {out_dir}; total {summary['seconds']:.0f} s")
    return summary


def teacher_device(teacher):
    """The device the teacher's weights are on (where the demo evaluates).

    Args:
        teacher: a torch module.

    Returns:
        torch.device: its device (the CPU for a module without parameters).
    """
    import torch

    return next((p.device for p in teacher.parameters()), torch.device("cpu"))
