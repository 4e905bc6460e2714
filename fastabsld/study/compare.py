"""``compare``: several training methods x seeds on one data set and one cached teacher, evaluated side by side.

A method spec is a method of the recipe (``TrainConfig.METHODS``), optionally followed by ``+reweight`` for
Fair-ARD's class re-weighting of a distillation method: ``pgd-at``, ``trades``, ``ard``, ``iad``, ``rslad``,
``absld``, ``ard+reweight``, ``absld+reweight``... Every spec is trained with every seed under the same
budget (the base config: data set, epochs, threat model...), each run in its own folder
``<out>/<spec>-seed<N>``. A run that finished there before is not trained again, an interrupted one is
resumed from its ``last.pt``; a folder holding a run of another configuration is an error, not overwritten.

Each finished run is evaluated on the test split with the kept (validation-selected) weights under the
chosen attacks: the run's own final test covers them and leaves its per-example results in
``predictions.npz``; attacks it lacks are evaluated from its ``best.pt`` (figures kept in
``compare_eval.json``, per-example results added to ``predictions.npz``). The teacher is evaluated
under the same attacks (the table's first row, cached in ``teacher_test.json``). Per method and attack
the table gives the average accuracy, the worst-class accuracy and NSD as the mean over the seeds with
a 95% interval, and each method's paired difference from a reference method (same seeds, same test
images) with a 95% interval and a verdict that survives Holm's correction over the table, from a
hierarchical bootstrap (:mod:`fastabsld.study.statistics`). Students still improving at their last
epoch, or far below the teacher's clean accuracy, are flagged. ``compare.json`` and ``compare.png`` go
into ``<out>``.

The runs are launched by one function, :func:`_train_all` (in this process, or ``jobs`` worker
processes); everything before it decides what to train, everything after it reads run folders.
"""

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from fastabsld.recipe import logs, report
from fastabsld.recipe.config import DEFAULT_TEACHER_EPOCHS, DISTILLATION_METHODS, METHODS, RUNTIME_FIELDS, TrainConfig
from fastabsld.study import report as study_report
from fastabsld.study import statistics

REWEIGHT = "+reweight"
DEFAULT_METHODS = ("pgd-at", "trades", "ard", "rslad", "absld", "absld+reweight")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_ATTACKS = ("clean", "fgsm", "pgd20", "cw20")
DEFAULT_REFERENCE = "absld"
# Settings of the base config where compare's default differs from TrainConfig's: the demo's budget, so that
# the demo and compare share one cached teacher. Weights are selected on validation every epoch, as train does.
DEFAULTS = {"dataset": "digits", "epochs": 30, "teacher_epochs": DEFAULT_TEACHER_EPOCHS}
COMPARE_FILE = "compare.json"
PLOT_FILE = "compare.png"
EXTRA_EVAL_FILE = "compare_eval.json"
TEACHER_TEST_FILE = "teacher_test.json"
FAR_BELOW_TEACHER = 0.10  # a student's mean clean accuracy this far below the teacher's is flagged
LOG_FILE = "train.log"


@dataclass(frozen=True)
class MethodSpec:
    """One compared method: a recipe method, with or without Fair-ARD re-weighting.

    Attributes:
        method: ``TrainConfig.method``.
        reweight: ``TrainConfig.reweight``.
    """

    method: str
    reweight: bool = False

    @property
    def name(self):
        """The spec as written: ``absld`` or ``absld+reweight``."""
        return self.method + (REWEIGHT if self.reweight else "")


def parse_method(text):
    """A method spec from its text: ``<method>`` or ``<distillation method>+reweight``.

    Args:
        text: the spec, e.g. ``"ard"`` or ``"absld+reweight"``.

    Returns:
        MethodSpec: the spec.

    Raises:
        ValueError: an unknown method, or re-weighting of a method without teacher.
    """
    if not isinstance(text, str):
        raise ValueError(f"a method spec must be a string such as 'absld' or 'absld+reweight', got {text!r}")
    method, reweight = (text[:-len(REWEIGHT)], True) if text.endswith(REWEIGHT) else (text, False)
    if method not in METHODS:
        raise ValueError(f"method spec {text!r}: the method must be one of {METHODS}, optionally followed by "
                         f"'{REWEIGHT}'")
    if reweight and method not in DISTILLATION_METHODS:
        raise ValueError(f"method spec {text!r}: '{REWEIGHT}' re-weights a distillation loss "
                         f"({', '.join(DISTILLATION_METHODS)}); {method} distils from no teacher")
    return MethodSpec(method, reweight)


def run_folder(out_dir, spec, seed):
    """The folder of one run: ``<out_dir>/<spec>-seed<seed>``.

    Args:
        out_dir: the comparison's folder.
        spec: MethodSpec.
        seed: the run's seed.

    Returns:
        str: the path.
    """
    return os.path.join(out_dir, f"{spec.name}-seed{seed}")


def run_config(base, spec, seed, attacks):
    """The config of one run: ``base`` with the spec's method and re-weighting, the seed and the test attacks.

    Args:
        base: TrainConfig shared by all runs.
        spec: MethodSpec.
        seed: the run's seed.
        attacks: the test attacks.

    Returns:
        TrainConfig: the (validated) config.
    """
    return dataclasses.replace(base, method=spec.method, reweight=spec.reweight, seed=seed,
                               test_attacks=tuple(attacks))


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise ValueError(f"{path} is not readable JSON ({error}); remove it or choose another folder") from None


# Fields that may differ between the saved run and this comparison's config of it.
_FREE_FIELDS = RUNTIME_FIELDS + ("test_attacks",)


def finished_test(run_dir, cfg):
    """The test evaluation of the run in ``run_dir`` when it finished with ``cfg``'s recipe, else None.

    Args:
        run_dir: the run's folder.
        cfg: the TrainConfig this comparison runs there.

    Returns:
        dict or None: ``{attack: {...}}`` of the run's final test (None: not started or not finished).

    Raises:
        ValueError: the folder holds a run of another recipe (naming the differing fields).
    """
    metrics = _read_json(os.path.join(run_dir, report.METRICS_FILE))
    if metrics is None:
        return None
    saved, wanted = metrics.get("config") or {}, _jsonable(cfg.to_dict())
    changed = sorted(k for k in set(saved) | set(wanted) if k not in _FREE_FIELDS and saved.get(k) != wanted.get(k))
    if changed:
        raise ValueError(f"{run_dir} holds a run of another configuration (fields: {', '.join(changed)}); remove "
                         "it or choose another output folder")
    return metrics.get("test") or None


def _nan(value):
    return math.nan if value is None else value


def _clean(evaluation):
    """An evaluation read back from JSON, where undefined figures were written as null: NaN again."""
    return {attack: {key: ([_nan(v) for v in value] if isinstance(value, list) else _nan(value))
                     for key, value in result.items()} for attack, result in evaluation.items()}


def run_results(run_dir, test, attacks, data, device):
    """A finished run's figures and per-example results for ``attacks`` (those it lacks evaluated on its kept weights).

    The run's final test wrote ``predictions.npz``; an attack missing there (a run of an older version, or
    an attack the run was not tested with) is evaluated from ``best.pt``, its per-example results added to
    ``predictions.npz`` and its figures kept in ``compare_eval.json`` beside the run.

    Args:
        run_dir: the run's folder.
        test: the run's own test figures (``metrics.json``'s ``test``).
        attacks: the attacks the comparison needs.
        data: the Splits the runs were trained on.
        device: the device of the evaluation.

    Returns:
        tuple: (``{attack: figures}``, :class:`fastabsld.recipe.predictions.Predictions`).
    """
    from fastabsld.recipe import predictions

    path = os.path.join(run_dir, predictions.FILE)
    kept = predictions.load(path).attacks if os.path.exists(path) else ()
    extra = _read_json(os.path.join(run_dir, EXTRA_EVAL_FILE)) or {}
    missing = [a for a in attacks if a not in kept]
    if missing:
        from fastabsld.evaluation import evaluate
        from fastabsld.recipe.data import eval_loader, split_size
        from fastabsld.recipe.runfiles import load_run_model

        model, cfg, _ = load_run_model(os.path.join(run_dir, "best.pt"), device)
        results = evaluate(model, eval_loader(data.test, max(cfg.batch_size, 256), cfg.num_workers), missing,
                           eps=cfg.eps, alpha=cfg.alpha, num_classes=data.num_classes, device=device, progress=False)
        predictions.save(path, results, predictions.identity(
            cfg, data, split="test", split_size=split_size(data.test), checkpoint="best.pt"), keep_existing=True)
        extra.update({a: results[a] for a in missing if a not in test})
        report.write_metrics(run_dir, extra, name=EXTRA_EVAL_FILE)
    merged = {**extra, **test}
    return _clean({a: merged[a] for a in attacks}), predictions.load(path)


def study_of(predictions_by_run, names, seeds, attacks, num_classes):
    """The per-example results of the table, checked to be of the same test examples in the same order.

    Args:
        predictions_by_run: ``{(spec name, seed): Predictions}``.
        names: the spec names, in the table's order.
        seeds: the seeds.
        attacks: the attacks.
        num_classes: the data set's number of classes.

    Returns:
        fastabsld.study.statistics.Study: the results.

    Raises:
        ValueError: two runs evaluated on different examples or under different settings.
    """
    from fastabsld.recipe.predictions import check_same_examples

    first = predictions_by_run[(names[0], seeds[0])]
    for key, found in predictions_by_run.items():
        try:
            check_same_examples(first, found)
        except ValueError as error:
            raise ValueError(f"{key[0]} seed {key[1]} and {names[0]} seed {seeds[0]} cannot be paired: {error}") \
                from None
    correct = {name: {attack: np.stack([predictions_by_run[(name, seed)].correct[attack] for seed in seeds])
                      for attack in attacks} for name in names}
    return statistics.make_study(first.labels, correct, seeds, num_classes)


def _kept_epoch(run_dir):
    """The epoch whose weights a finished run kept (chosen on validation), from its metrics.json."""
    return ((_read_json(os.path.join(run_dir, report.METRICS_FILE)) or {}).get("best") or {}).get("epoch")


def student_flags(summary, kept_epochs, epochs, teacher_test, *, far_below=FAR_BELOW_TEACHER):
    """Warnings on students that may be undertrained: still improving at the last epoch, or far below the teacher.

    Args:
        summary: ``{spec: {attack: {metric: {"mean", ...}}}}`` (:func:`fastabsld.study.statistics.summarise`).
        kept_epochs: ``{spec: [kept epoch per seed]}`` (None where unknown).
        epochs: the runs' number of epochs.
        teacher_test: the teacher's test figures ``{attack: {"average", ...}}``, or None.
        far_below: how far below the teacher's clean accuracy a student's mean is flagged.

    Returns:
        list of str: one line per flagged spec and reason.
    """
    flags = []
    for name, kept in kept_epochs.items():
        last = [i for i, epoch in enumerate(kept) if epoch == epochs]
        if last:
            flags.append(f"{name}: still improving at the last epoch in {len(last)} of {len(kept)} seeds (the "
                         f"validation-selected weights are those of epoch {epochs}): more epochs may change the table")
    clean = (teacher_test or {}).get("clean")
    if clean is not None and math.isfinite(_nan(clean["average"])):
        for name, cells in summary.items():
            if "clean" in cells and cells["clean"]["average"]["mean"] < clean["average"] - far_below:
                flags.append(f"{name}: clean accuracy {cells['clean']['average']['mean']:.3f}, "
                             f"{clean['average'] - cells['clean']['average']['mean']:.3f} below the teacher's "
                             f"{clean['average']:.3f}: undertrained?")
    return flags


def teacher_test(out_dir, teacher, teacher_info, attacks, data, base, device):
    """The teacher's test figures under ``attacks`` (the table's first row), cached in ``<out_dir>/teacher_test.json``.

    Args:
        out_dir: the comparison's folder.
        teacher: the frozen teacher.
        teacher_info: its description (``path`` or ``name`` identifies it).
        attacks: the attacks.
        data: Splits.
        base: the base TrainConfig (threat model, batch size).
        device: the device of the evaluation.

    Returns:
        dict: ``{attack: {"average", "worst", "nsd", ...}}``.
    """
    from fastabsld.evaluation import evaluate
    from fastabsld.recipe.data import eval_loader, split_size

    identity = {"teacher": teacher_info.get("path") or teacher_info.get("name"), "dataset": base.dataset,
                "split_seed": base.split_seed, "test_size": split_size(data.test), "eps": base.eps, "alpha": base.alpha}
    cached = _read_json(os.path.join(out_dir, TEACHER_TEST_FILE)) or {}
    figures = cached.get("test", {}) if cached.get("identity") == _jsonable(identity) else {}
    missing = [a for a in attacks if a not in figures]
    if missing:
        results = evaluate(teacher, eval_loader(data.test, max(base.batch_size, 256), base.num_workers), missing,
                           eps=base.eps, alpha=base.alpha, num_classes=data.num_classes, device=device,
                           progress=False)
        figures = {**figures, **{a: results[a] for a in missing}}
        os.makedirs(out_dir, exist_ok=True)
        report.write_metrics(out_dir, {"identity": identity, "test": figures}, name=TEACHER_TEST_FILE)
    return _clean({a: figures[a] for a in attacks})


def _run_log(run_dir, prefix):
    """A log function appending the run's lines to ``<run_dir>/train.log`` (the comparison prints one per run)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOG_FILE)

    def log(line):
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{prefix}{line}\n")

    return log


def _train_run(fields, run_dir, threads, data=None, teacher_info=None):
    """Trains (or resumes) one run; in a worker process too (the teacher comes from the cache, evaluated once)."""
    import torch

    from fastabsld.recipe.train import train

    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(**fields)
    began = time.perf_counter()
    result = train(cfg, run_dir, resume=True, data=data, log=_run_log(run_dir, ""),
                   teacher_info=teacher_info if cfg.method in DISTILLATION_METHODS else None)
    return result["test"], time.perf_counter() - began


def _base_config(config):
    if isinstance(config, TrainConfig):
        return config
    fields = {**DEFAULTS, **(config or {})}
    for name in ("method", "reweight", "seed", "test_attacks"):
        if name in fields:
            raise ValueError(f"config must not set {name!r}: compare sets it per run (methods, seeds, attacks)")
    return TrainConfig(**fields)


def _check_list(values, name):
    values = list(values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat an entry, got {values}")
    return values


def compare(out_dir="runs/compare", *, methods=DEFAULT_METHODS, seeds=DEFAULT_SEEDS, attacks=DEFAULT_ATTACKS,
            reference=DEFAULT_REFERENCE, config=None, jobs=1, threads=1, data=None, log=None, launcher=None):
    """Trains every method spec with every seed (or reuses the finished runs), evaluates them, tabulates them.

    Args:
        out_dir: the comparison's folder (a run folder per spec and seed, compare.json, compare.png).
        methods: method specs (``"absld"``, ``"absld+reweight"``...; see :func:`parse_method`).
        seeds: the seeds (the same for every method: the differences are paired by seed).
        attacks: the test attacks (names of ``fastabsld.evaluation.ATTACKS``).
        reference: the spec the paired differences are taken from (one of ``methods``).
        config: the base config shared by every run: a TrainConfig, or a dict of its fields over
            :data:`DEFAULTS` (without method, reweight, seed and test_attacks, which compare sets per run).
        jobs: runs trained at once by the default local launcher, each in a process of its own (1: one after the
            other in this process).
        threads: torch CPU threads per run (1 is fastest for the digits models on a shared machine; 0 keeps
            torch's choice).
        data: preloaded Splits of the base config's data set (``None``: loaded from the config); the worker
            processes of ``jobs > 1`` load it themselves.
        log: function printing one-line messages (default: :func:`fastabsld.recipe.logs.info`). Each run's own
            lines (one per epoch) go to ``train.log`` in its folder.
        launcher: where the runs train (a :class:`fastabsld.study.launchers.Launcher`; default: a
            ``LocalLauncher(jobs, threads)`` on this machine; :class:`fastabsld.study.slurm.SlurmLauncher`
            submits them to SLURM). When it leaves runs unfinished (submitted without waiting), compare returns
            its word on them (``unfinished``, ``jobs``, ``collect``) instead of the summary.

    Returns:
        dict: the summary written to ``compare.json`` (``methods``, ``seeds``, ``attacks``, ``reference``,
        ``config``, ``teacher``, ``teacher_test``: its test figures, ``runs``: spec -> per-seed test evaluations,
        ``class_counts``: test images per class, ``summary``: means, intervals, paired differences and verdicts
        (see :func:`fastabsld.study.statistics.summarise`), ``statistics``: how they were computed and the
        warning of fewer than 3 seeds, ``flags``: see :func:`student_flags`, ``kept_epochs``, ``table``,
        ``trained``/``reused`` run folders, ``plot``, ``seconds``).

    Raises:
        ValueError: a bad spec, seed, attack or setting, or a run folder holding another configuration.
    """
    import torch

    log = log or logs.info
    began = time.perf_counter()
    specs = [parse_method(text) for text in _check_list(methods, "methods")]
    names = [spec.name for spec in specs]
    seeds = statistics.check_seeds(seeds)
    from fastabsld.evaluation import attack_names

    attacks = list(attack_names(_check_list(attacks, "attacks")))
    if reference not in names:
        raise ValueError(f"reference {reference!r} must be one of the compared methods {names}")
    from fastabsld.study.launchers import LocalLauncher

    launcher = launcher or LocalLauncher(jobs, threads)
    base = _base_config(config)
    configs = {(spec.name, seed): run_config(base, spec, seed, attacks) for spec in specs for seed in seeds}
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _compare(out_dir, specs, seeds, attacks, reference, base, configs, launcher, data, log, began)
    finally:
        torch.set_num_threads(previous)


def _compare(out_dir, specs, seeds, attacks, reference, base, configs, launcher, data, log, began):
    """The body of :func:`compare` on checked arguments."""
    from fastabsld.recipe.data import load_for_config
    from fastabsld.recipe.runtime import resolve_device
    names = [spec.name for spec in specs]
    tests, trained, reused, pending = {}, [], [], []
    for key, cfg in configs.items():  # a folder of another configuration fails before anything trains
        folder = run_folder(out_dir, parse_method(key[0]), key[1])
        test = finished_test(folder, cfg)
        if test is None:
            pending.append((key, cfg, folder))
        else:
            tests[key] = test
            reused.append(folder)
    data = data if data is not None else load_for_config(base)
    # ---- launching: the launcher trains the pending runs (here, in worker processes or as SLURM jobs).
    # The teacher is trained and cached once, before any run needs it (None: a job of the launcher trains it).
    distilling = any(spec.method in DISTILLATION_METHODS for spec in specs)
    teacher, teacher_info = launcher.teacher(base, data, pending, log) if distilling else (None, None)
    teacher_path = teacher_info and (teacher_info.get("path") or teacher_info.get("name"))
    teacher_path = teacher_path or ("trained by a job first" if distilling else "none needed")
    log(f"compare: {', '.join(names)} x seeds {seeds} on {base.dataset} ({base.model}, {base.epochs} epochs, "
        f"eps={base.eps:.4g}, {base.steps} PGD steps); teacher {teacher_path}; runs in {out_dir}")
    if reused:
        log(f"{len(reused)} of {len(configs)} runs finished before: not trained again")
    for index, (key, test, seconds) in enumerate(launcher.train(pending, _train_run, data, teacher_info, log), 1):
        tests[key] = test
        trained.append(run_folder(out_dir, parse_method(key[0]), key[1]))
        robust = [a for a in attacks if a != "clean"]
        figure = ""
        if robust:
            attack = report.robust_attack({a: None for a in robust})
            result = tests[key][attack]
            figure = (f"; test {study_report.attack_title(attack)} avg {result['average']:.3f}, worst "
                      f"{_nan(result['worst']):.3f}")
        log(f"  [{index}/{len(pending)}] {key[0]} seed {key[1]}: trained in {seconds:.0f} s{figure}")
    unfinished = [key for key in configs if key not in tests]
    if unfinished:
        return launcher.unfinished(unfinished, log)
    if distilling and teacher_info is None:  # trained by a job of the launcher: in the cache now
        teacher, teacher_info = launcher.teacher(base, data, [], log)
    # ---- end of launching

    device = resolve_device(base.device)
    runs, per_example = {name: [] for name in names}, {}
    for name in names:
        for seed in seeds:
            figures, per_example[(name, seed)] = run_results(run_folder(out_dir, parse_method(name), seed),
                                                             tests[(name, seed)], attacks, data, device)
            runs[name].append(figures)
    study = study_of(per_example, names, seeds, attacks, data.num_classes)
    stats = statistics.summarise(study, reference)
    teacher_figures = teacher_test(out_dir, teacher, teacher_info, attacks, data, base, device) if teacher else None
    kept = {name: [_kept_epoch(run_folder(out_dir, parse_method(name), seed)) for seed in seeds] for name in names}
    flags = student_flags(stats["summary"], kept, base.epochs, teacher_figures)
    table = study_report.format_table(stats, attacks, reference, seeds, class_counts=study.class_counts,
                                      teacher=teacher_figures, flags=flags, selection=study_report.selection(base))
    plot = study_report.plot_comparison(stats["summary"], attacks, os.path.join(out_dir, PLOT_FILE),
                                        f"{base.dataset} test split: {len(names)} methods x {len(seeds)} seeds "
                                        f"({base.epochs} epochs)", seeds=len(seeds),
                                        confidence=stats["confidence"])
    result = {"methods": names, "seeds": seeds, "attacks": attacks, "reference": reference, "config": base.to_dict(),
              "teacher": teacher_info, "teacher_test": teacher_figures, "runs": runs,
              "class_counts": study.class_counts.tolist(), "summary": stats["summary"],
              "statistics": {k: v for k, v in stats.items() if k != "summary"}, "flags": flags, "kept_epochs": kept,
              "table": table, "trained": trained, "reused": reused, "plot": plot,
              "seconds": time.perf_counter() - began}
    report.write_metrics(out_dir, result, name=COMPARE_FILE)
    log("")
    log(table)
    log("")
    log(f"report: {os.path.join(out_dir, COMPARE_FILE)}; plot: {plot}; per-run folders under {out_dir} "
        f"({len(trained)} trained, {len(reused)} reused); total {result['seconds']:.0f} s")
    return result

