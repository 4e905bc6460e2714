"""``compare``: several training methods x seeds on one data set and one cached teacher, evaluated side by side.

A method spec is a method of the recipe (``TrainConfig.METHODS``), optionally followed by ``+reweight`` for
Fair-ARD's class re-weighting of a distillation method: ``pgd-at``, ``trades``, ``ard``, ``iad``, ``rslad``,
``absld``, ``ard+reweight``, ``absld+reweight``... Every spec is trained with every seed under the same
budget (the base config: data set, epochs, threat model...), each run in its own folder
``<out>/<spec>-seed<N>``. A run that finished there before is not trained again, an interrupted one is
resumed from its ``last.pt``; a folder holding a run of another configuration is an error, not overwritten.

Each finished run is evaluated on the test split with the kept (validation-selected) weights under the
chosen attacks (the run's own final test covers them; attacks it lacks are evaluated from its ``best.pt``
and kept in ``compare_eval.json`` beside it). Per method and attack the table gives the average accuracy,
the worst-class accuracy and NSD as mean +- population std over the seeds, and each method's paired
difference from a reference method (same seed), judged as the demo judges it
(:func:`fastabsld.recipe.demo.verdict`: a difference counts only beyond the larger seed std of the two).
``compare.json`` and ``compare.png`` go into ``<out>``.
"""

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

from fastabsld.recipe import logs, report
from fastabsld.recipe.config import DEFAULT_TEACHER_EPOCHS, DISTILLATION_METHODS, METHODS, RUNTIME_FIELDS, TrainConfig
from fastabsld.recipe.demo import mean_std, verdict

REWEIGHT = "+reweight"
DEFAULT_METHODS = ("pgd-at", "trades", "ard", "rslad", "absld", "absld+reweight")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_ATTACKS = ("clean", "fgsm", "pgd20", "cw20")
DEFAULT_REFERENCE = "absld"
# Settings of the base config where compare's default differs from TrainConfig's: the demo's budget, so that
# the demo and compare share one cached teacher.
DEFAULTS = {"dataset": "digits", "epochs": 30, "teacher_epochs": DEFAULT_TEACHER_EPOCHS, "eval_every": 5}
# (key in the evaluation, column title, higher is better)
METRICS = (("average", "average", True), ("worst", "worst class", True), ("nsd", "NSD (lower=fairer)", False))
COMPARE_FILE = "compare.json"
PLOT_FILE = "compare.png"
EXTRA_EVAL_FILE = "compare_eval.json"
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


def _evaluate_missing(run_dir, test, attacks, data, device):
    """``test`` completed with the attacks it lacks, evaluated on the kept weights (cached beside the run)."""
    extra_path = os.path.join(run_dir, EXTRA_EVAL_FILE)
    extra = _read_json(extra_path) or {}
    missing = [a for a in attacks if a not in test and a not in extra]
    if missing:
        from fastabsld.evaluation import evaluate
        from fastabsld.recipe.data import eval_loader
        from fastabsld.recipe.runfiles import load_run_model

        model, cfg, _ = load_run_model(os.path.join(run_dir, "best.pt"), device)
        results = evaluate(model, eval_loader(data.test, max(cfg.batch_size, 256), cfg.num_workers), missing,
                           eps=cfg.eps, alpha=cfg.alpha, num_classes=data.num_classes, device=device, progress=False)
        extra.update(results)
        report.write_metrics(run_dir, extra, name=EXTRA_EVAL_FILE)
    merged = {**extra, **test}
    return _clean({a: merged[a] for a in attacks})


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


def aggregate(results, seeds, attacks, reference):
    """Mean and spread over seeds per method, attack and metric, and each method's paired difference from a reference.

    Args:
        results: dict spec name -> list (per seed, in ``seeds``' order) of test evaluations
            ``{attack: {"average", "worst", "nsd", ...}}``.
        seeds: the seeds (the pairing: the i-th value of every method comes from seed ``seeds[i]``).
        attacks: the attacks to summarise.
        reference: the spec name the differences are taken from.

    Returns:
        dict: ``{spec: {attack: {metric: {"values", "mean", "std", "diff", "diff_std", "verdict"}}}}`` where
        ``diff`` is the mean over seeds of ``method - reference`` on the same seed, ``diff_std`` its population
        std, and ``verdict`` ``"better"`` / ``"worse"`` / ``"within noise"`` as
        :func:`fastabsld.recipe.demo.verdict` judges it (``"reference"`` for the reference itself, ``"n/a"``
        when a value is undefined, e.g. NSD with every class at 0).
    """
    if reference not in results:
        raise ValueError(f"reference {reference!r} must be one of the compared methods {list(results)}")
    summary = {}
    for name, runs in results.items():
        if len(runs) != len(seeds):
            raise ValueError(f"{name} has {len(runs)} results for {len(seeds)} seeds")
        summary[name] = {}
        for attack in attacks:
            summary[name][attack] = {}
            for key, _, higher in METRICS:
                values = [_nan(run[attack][key]) for run in runs]
                ref_values = [_nan(run[attack][key]) for run in results[reference]]
                defined = all(math.isfinite(v) for v in values)
                mean, std = mean_std(values) if defined else (math.nan, math.nan)
                if name == reference:
                    word, diff, diff_std = "reference", 0.0, 0.0
                elif all(math.isfinite(v) for v in values + ref_values):
                    word, diff = verdict(ref_values, values, higher)
                    diff_std = mean_std([v - r for v, r in zip(values, ref_values)])[1]
                else:
                    word, diff, diff_std = "n/a", math.nan, math.nan
                summary[name][attack][key] = {"values": values, "mean": mean, "std": std, "diff": diff,
                                              "diff_std": diff_std, "verdict": word}
    return summary


def _cell(mean, std):
    return "n/a" if not math.isfinite(mean) else f"{mean:.3f} +- {std:.3f}"


def format_table(summary, attacks, reference, seeds, *, test_size=None):
    """The comparison table: per attack, each method's mean +- std over seeds and its paired difference's verdict.

    Args:
        summary: from :func:`aggregate`.
        attacks: the attacks, in the order of the blocks.
        reference: the reference spec name.
        seeds: the seeds.
        test_size: number of test images (for the heading), or None.

    Returns:
        str: the table and, for the strongest attack, which methods differ from the reference beyond the noise.
    """
    width, label = 21, 24
    images = f" ({test_size} images)" if test_size else ""
    lines = [f"test split{images}, {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
             f"({', '.join(map(str, seeds))}): mean +- population std over the seeds",
             f"'- {reference}': the paired difference method - {reference} (same seed, mean over seeds) and its "
             "verdict; a difference counts only when it exceeds the larger std over seeds of the two"]
    for attack in attacks:
        title = report.ATTACK_LABELS.get(attack, attack)
        head = f"{title:<{label}}" + "".join(f"{column:>{width}}" for _, column, _ in METRICS)
        lines += ["", head, "-" * len(head)]
        order = [reference] + [name for name in summary if name != reference]
        for name in order:
            cells = summary[name][attack]
            shown = f"{name} (reference)" if name == reference else name
            lines.append(f"{shown:<{label}}" + "".join(f"{_cell(cells[k]['mean'], cells[k]['std']):>{width}}"
                                                       for k, _, _ in METRICS))
            if name != reference:
                diffs = []
                for key, _, _ in METRICS:
                    diff, word = cells[key]["diff"], cells[key]["verdict"]
                    diffs.append("n/a" if word == "n/a" else f"{diff:+.3f} {word}")
                lines.append(f"{'  - ' + reference:<{label}}" + "".join(f"{d:>{width}}" for d in diffs))
    robust = [a for a in attacks if a != "clean"]
    if robust and len(summary) > 1:
        attack = report.robust_attack({a: None for a in robust})
        title = report.ATTACK_LABELS.get(attack, attack)
        lines.append("")
        for key, column, _ in METRICS:
            groups = {word: [n for n in summary if summary[n][attack][key]["verdict"] == word]
                      for word in ("better", "worse", "within noise")}
            parts = [f"{word} than {reference}: {', '.join(groups[word])}" for word in ("better", "worse")
                     if groups[word]]
            parts.append(f"within the seed spread of {reference}: {', '.join(groups['within noise']) or 'none'}")
            lines.append(f"{title} {column}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


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
        ``config``, ``teacher``, ``runs``: spec -> per-seed test evaluations, ``summary``: see
        :func:`aggregate`, ``table``, ``trained``/``reused`` run folders, ``plot``, ``seconds``).

    Raises:
        ValueError: a bad spec, seed, attack or setting, or a run folder holding another configuration.
    """
    import torch

    log = log or logs.info
    began = time.perf_counter()
    specs = [parse_method(text) for text in _check_list(methods, "methods")]
    names = [spec.name for spec in specs]
    seeds = _check_list(seeds, "seeds")
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
    from fastabsld.recipe.data import load_for_config, split_size
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
    teacher_info = launcher.teacher(base, data, pending, log) if distilling else None
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
            figure = (f"; test {report.ATTACK_LABELS.get(attack, attack)} avg {result['average']:.3f}, worst "
                      f"{_nan(result['worst']):.3f}")
        log(f"  [{index}/{len(pending)}] {key[0]} seed {key[1]}: trained in {seconds:.0f} s{figure}")
    unfinished = [key for key in configs if key not in tests]
    if unfinished:
        return launcher.unfinished(unfinished, log)
    if distilling and teacher_info is None:  # trained by a job of the launcher: in the cache now
        teacher_info = launcher.teacher(base, data, [], log)
    # ---- end of launching

    device = resolve_device(base.device)
    runs = {name: [_evaluate_missing(run_folder(out_dir, parse_method(name), seed), tests[(name, seed)], attacks,
                                     data, device) for seed in seeds] for name in names}
    summary = aggregate(runs, seeds, attacks, reference)
    table = format_table(summary, attacks, reference, seeds, test_size=split_size(data.test))
    plot = report.plot_comparison(summary, attacks, os.path.join(out_dir, PLOT_FILE),
                                  f"{base.dataset} test split: {len(names)} methods x {len(seeds)} seeds "
                                  f"({base.epochs} epochs)", seeds=len(seeds))
    result = {"methods": names, "seeds": seeds, "attacks": attacks, "reference": reference, "config": base.to_dict(),
              "teacher": teacher_info, "runs": runs, "summary": summary, "table": table, "trained": trained,
              "reused": reused, "plot": plot, "seconds": time.perf_counter() - began}
    report.write_metrics(out_dir, result, name=COMPARE_FILE)
    log("")
    log(table)
    log("")
    log(f"report: {os.path.join(out_dir, COMPARE_FILE)}; plot: {plot}; per-run folders under {out_dir} "
        f"({len(trained)} trained, {len(reused)} reused); total {result['seconds']:.0f} s")
    return result

