"""The ``fastabsld`` command line: ``train`` and ``eval`` here; ``demo`` and ``compare`` join them from
``fastabsld.study.cli``, whose ``main`` is the ``fastabsld`` program.

Examples:
  fastabsld demo                                   # RSLAD vs ABSLD on digits, CPU, a few minutes
  fastabsld compare pgd-at trades ard rslad absld absld+reweight --seeds 0 1 2
                                                   # methods x seeds on digits, one table
  fastabsld train --method absld --epochs 30 --run-dir runs/absld
  fastabsld train --run-dir runs/absld --resume    # continue a killed run
  fastabsld eval runs/absld/best.pt --attacks clean pgd20 cw20 --n-examples 1000
  fastabsld train --dataset cifar10 --data-dir data --epochs 300 --device cuda \\
      --teacher-path model_cifar_wrn.pt            # the paper's setting (TRADES WRN-34-10 teacher)
  fastabsld train --dataset folder --data-dir my_images --image-size 32 --model mypkg.nets:small_cnn
  fastabsld train --config run.toml                # settings from a file (flags override it)
  torchrun --nproc_per_node=4 -m fastabsld train --dataset cifar10 --device cuda --batch-size 128 ...
                                                   # 4 GPUs, 32 images per GPU per step

Every error is one line ``error: ...`` and exit status 2; Ctrl-C prints how to resume and exits 130, SIGTERM (a
scheduler's stop) prints the same and exits 143.
Set FASTABSLD_TRACEBACK=1 to see the traceback of an error.
"""

import argparse
import contextlib
import datetime
import math
import os
import platform
import shlex
import signal
import sys
import threading
import time

from fastabsld.evaluation import AUTOATTACK_BACKENDS, AUTOATTACK_VERSIONS

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM
EVAL_ATTACKS = ("clean", "fgsm", "pgd20", "cw20")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``error:`` line (and exit status 2), not a usage block.

    Flags are never abbreviated: ``compare --seed 3`` would otherwise run as ``--seeds 3``.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_ERROR, f"error: {message} (see '{self.prog} --help')\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that the run unwinds (and its files stay whole) as on Ctrl-C."""


@contextlib.contextmanager
def _sigterm_unwinds():
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def positive_int(text):
    """An argparse type: an integer >= 1.

    Args:
        text: the flag's value.

    Returns:
        int: the value.

    Raises:
        argparse.ArgumentTypeError: not an integer, or below 1.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _number(text):
    from fastabsld.recipe.options import parse_number

    try:
        return parse_number(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def set_threads(threads):
    """Sets torch's CPU threads for a command (``--threads``).

    Args:
        threads: the number of threads, or None / 0 to keep torch's choice.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)


def _error(message):
    from fastabsld.recipe import logs

    if logs.logger().handlers:  # inside logs.setup: the console and the --log-file
        logs.error(f"error: {message}")
    else:
        print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _train(args):
    from fastabsld.recipe import distributed

    set_threads(args.threads)
    with distributed.session(_requested_device(args)) as ctx:
        return _train_in(args, ctx)


def _requested_device(args):
    from fastabsld.recipe.options import requested_settings

    return requested_settings(args).get("device", "cpu")


def train_config(args):
    """The TrainConfig that ``fastabsld train`` runs with these parsed arguments (before any resume).

    Args:
        args: the namespace from :func:`build_parser` for the ``train`` command.

    Returns:
        TrainConfig: the config (validated): defaults, then ``--config FILE``, then the flags given.

    Raises:
        ValueError: a bad value or file, naming the setting.
    """
    from fastabsld.recipe.config import TrainConfig
    from fastabsld.recipe.options import requested_settings

    return TrainConfig.from_dict(requested_settings(args), source="the settings")


def resumed_config(saved, requested, run_dir, log=None):
    """The config of a resumed run: the saved one, with the requested changes that a resume may make.

    Args:
        saved: the TrainConfig saved in ``last.pt``.
        requested: the settings given now (``--config`` and flags).
        run_dir: the run folder (for messages).
        log: prints the changes applied (default: :func:`fastabsld.recipe.logs.info`).

    Returns:
        TrainConfig: the config to continue with.

    Raises:
        ValueError: a requested change of a setting that defines the run, naming each.
    """
    from fastabsld.recipe import logs
    from fastabsld.recipe.config import RESUMABLE_FIELDS, TrainConfig
    from fastabsld.recipe.options import describe_change, flag

    log = log or logs.info
    old = saved.to_dict()
    merged = TrainConfig.from_dict({**old, **requested}, source="the settings").to_dict()
    changed = [name for name in merged if merged[name] != old[name]]
    refused = [name for name in changed if name not in RESUMABLE_FIELDS]
    if refused:
        raise ValueError(f"--resume: {run_dir} was trained with other settings, which a resume cannot change: "
                         f"{'; '.join(describe_change(flag(n), old[n], merged[n]) for n in refused)}. Drop them to "
                         f"continue the run, or start a new one with another --run-dir (a resume may change only "
                         f"{', '.join(flag(n) for n in RESUMABLE_FIELDS)})")
    if changed:
        notes = [describe_change(flag(n), old[n], merged[n]) for n in changed]
        if "epochs" in changed:
            notes.append(f"the LR and beta milestones are rescaled to {merged['epochs']} epochs from the next epoch on")
        log(f"resuming {run_dir} with changed settings: {'; '.join(notes)}")
    return TrainConfig.from_dict(merged)


def _train_in(args, ctx):
    from fastabsld.recipe import lock
    from fastabsld.recipe.errors import RecipeError

    cfg = train_config(args)
    run_dir = args.run_dir or os.path.join("runs", f"{cfg.method}-{cfg.dataset}-{cfg.model}-seed{cfg.seed}"
                                           .replace(":", "_").replace("/", "_"))
    args.resolved_run_dir = run_dir
    created = ctx.is_main and not os.path.exists(run_dir)
    try:  # rank 0 holds the run folder from before it looks into it until the run ends
        with lock.hold(run_dir) if ctx.is_main else contextlib.nullcontext():
            return _train_run(args, ctx, cfg, run_dir)
    except RecipeError as error:  # a folder in use, no usable checkpoint, a non-finite loss
        _error(" ".join(str(error).split()))
        return error.exit_status
    finally:
        if created:
            _remove_unused_folder(run_dir)


def _remove_unused_folder(run_dir):
    """Removes a run folder that this command created and that holds nothing but its lock file.

    A run that failed before writing anything (bad data, an unusable teacher) then leaves no folder behind.
    """
    from fastabsld.recipe import lock

    with contextlib.suppress(OSError):
        if os.listdir(run_dir) == [lock.LOCK_FILE]:
            os.remove(os.path.join(run_dir, lock.LOCK_FILE))
            os.rmdir(run_dir)


def _train_run(args, ctx, cfg, run_dir):
    from fastabsld.recipe import checkpoint, logs
    from fastabsld.recipe.options import requested_settings
    from fastabsld.recipe.runfiles import check_run_folder
    from fastabsld.recipe.runtime import resolve_device
    from fastabsld.recipe.train import train

    last = os.path.join(run_dir, "last.pt")
    exists = os.path.exists(last) or os.path.exists(checkpoint.previous_path(last))
    ctx.barrier()  # every rank has looked before rank 0 can write last.pt
    if exists:
        if not args.resume:
            return _error(f"{run_dir} holds a run already; pass --resume to continue it or choose another --run-dir")
        _, saved = check_run_folder(run_dir)
        cfg = resumed_config(saved, requested_settings(args), run_dir, log=logs.info if ctx.is_main else _silent)
        if ctx.is_main:
            logs.info(f"resuming {run_dir} ({cfg.method}, {cfg.epochs} epochs)")
    resolve_device(cfg.device)
    result = train(cfg, run_dir, resume=args.resume, accept_teacher_change=args.accept_teacher_change)
    if not ctx.is_main:
        return 0
    logs.info(_summary(result["test"]))
    logs.info(f"best epoch on validation: {result['best']['epoch']} "
              f"({cfg.select_metric} = {result['best']['value']:.4f})")
    logs.info(f"run folder: {run_dir} (metrics.json, best.pt, last.pt, plots)")
    return 0


def _silent(*args, **kwargs):
    pass


def _summary(test, nonfinite=False):
    """The table of an evaluation; ``nonfinite``: with the count of examples whose logits were NaN or infinite."""
    def cell(value):
        return f"{'n/a':>8}" if value is None or math.isnan(value) else f"{value:>8.4f}"

    lines = [f"{'attack':<12} {'average':>8} {'worst':>8} {'NSD':>8}" + (f" {'nonfinite':>9}" if nonfinite else "")]
    for attack, m in test.items():
        lines.append(f"{attack:<12} {cell(m['average'])} {cell(m['worst'])} {cell(m['nsd'])}"
                     + (f" {m.get('nonfinite', 0):>9d}" if nonfinite else ""))
    return "\n".join(lines)


def _versions(backend=None):
    import torch

    import fastabsld

    versions = {"fastabsld": fastabsld.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("torchattacks", "autoattack") if backend else ():
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    return versions


def eval_arguments(args):
    """Checks the evaluation settings of ``fastabsld eval`` before anything is loaded.

    Args:
        args: the parsed ``eval`` namespace.

    Returns:
        tuple: the canonical attack names.

    Raises:
        ValueError: a bad attack list, eps, alpha, steps or n_examples, naming it.
    """
    from fastabsld.evaluation import attack_names
    from fastabsld.ops.checks import check_real

    names = attack_names(args.attacks, args.steps)
    for name in ("eps", "alpha"):
        if getattr(args, name) is not None:
            check_real(getattr(args, name), name, minimum=0.0)
    return names


def eval_checkpoint(path):
    """The checkpoint ``fastabsld eval PATH`` evaluates: PATH itself, or a run folder's ``best.pt`` (else ``last.pt``).

    Args:
        path: a checkpoint file or a run folder.

    Returns:
        str: the checkpoint file.

    Raises:
        FileNotFoundError: no such file or folder, or a folder without ``best.pt`` / ``last.pt``.
    """
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or folder (give a checkpoint such as best.pt, or a run "
                                    "folder)")
        return path
    for name in ("best.pt", "last.pt"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"{path} is a folder without best.pt or last.pt: give a run folder or a checkpoint file")


def eval_outputs(args, checkpoint):
    """The files ``fastabsld eval`` writes, checked before anything runs.

    The per-class plot and the predictions go beside the ``--json`` file, or else beside the checkpoint
    (``<checkpoint>_<split>_per_class.png``, ``..._predictions.npz``); ``--plot`` and ``--predictions`` choose.

    Args:
        args: the parsed ``eval`` namespace.
        checkpoint: the evaluated checkpoint.

    Returns:
        dict: ``json`` (or None), ``plot`` and ``predictions`` paths.

    Raises:
        ValueError: an output that would replace a checkpoint or a run file (:func:`check_output_path`), or
            two outputs that are one file.
    """
    from fastabsld.recipe.predictions import FILE
    from fastabsld.recipe.runfiles import check_output_path

    stem = os.path.splitext(args.json)[0] if args.json else f"{os.path.splitext(checkpoint)[0]}_{args.split}"
    outputs = {"json": args.json, "plot": args.plot or f"{stem}_per_class.png",
               "predictions": args.predictions or f"{stem}_{FILE}"}
    for name, path in outputs.items():
        if path is not None:
            check_output_path(path, f"--{name}")
    named = [os.path.abspath(p) for p in outputs.values() if p is not None]
    if len(set(named)) != len(named) or os.path.abspath(checkpoint) in named:
        raise ValueError(f"--json, --plot and --predictions must name different files, none of them the checkpoint: "
                         f"{', '.join(f'{k} {v}' for k, v in outputs.items() if v)}")
    return outputs


def check_classes(state, checkpoint, data, where):
    """Refuses data whose classes differ from the checkpoint's (count or names).

    Args:
        state: the checkpoint dict (``num_classes``, and ``class_names`` when the run's data had names).
        checkpoint: its path (for the message).
        data: the Splits to evaluate on.
        where: the data's description (for the message).

    Raises:
        ValueError: naming both class lists.
    """
    theirs = list(state.get("class_names") or []) or None
    ours = list(data.class_names) if data.class_names else None

    def describe(count, names):
        return f"{count} classes" + (f" ({', '.join(map(str, names))})" if names else "")

    if state["num_classes"] != data.num_classes or (theirs and ours and theirs != ours):
        raise ValueError(f"{checkpoint} was trained on {describe(state['num_classes'], theirs)}, but {where} has "
                         f"{describe(data.num_classes, ours)}: evaluate it on data with its own classes")


def _unbounded(model, split, args, cfg, data, device):
    """The unbounded sanity attack (eps the whole input range): its figures, and the warning when it fails."""
    from fastabsld import sanity
    from fastabsld.evaluation import evaluate
    from fastabsld.recipe.data import eval_loader

    eps = 1.0  # images lie in [0, 1]
    attack = f"pgd{sanity.UNBOUNDED_STEPS}"
    result = evaluate(model, eval_loader(split, args.batch_size, cfg.num_workers), (attack,), eps=eps,
                      alpha=sanity.UNBOUNDED_STEP * eps, num_classes=data.num_classes, device=device,
                      progress=args.progress, seed=args.seed)
    warning = sanity.unbounded_warning(result.correct(attack), data.num_classes, eps)
    figures = {"attack": attack, "eps": eps, "alpha": sanity.UNBOUNDED_STEP * eps, "average": result[attack]["average"],
               "chance": 1.0 / data.num_classes, "nonfinite": result[attack]["nonfinite"]}
    return figures, warning


def _eval(args):
    import numpy as np

    from fastabsld import sanity
    from fastabsld.evaluation import evaluate
    from fastabsld.recipe import logs, predictions
    from fastabsld.recipe.data import balanced_indices, balanced_subset, eval_loader, load_for_config, split_size
    from fastabsld.recipe.report import plot_per_class, write_metrics
    from fastabsld.recipe.runfiles import load_run_model
    from fastabsld.recipe.runtime import resolve_device

    names = eval_arguments(args)
    checkpoint = eval_checkpoint(args.checkpoint)
    if checkpoint != args.checkpoint:
        logs.info(f"evaluating {checkpoint}")
    outputs = eval_outputs(args, checkpoint)
    set_threads(args.threads)
    device = resolve_device(args.device)
    model, cfg, state = load_run_model(checkpoint, device)
    if args.data_dir:
        import dataclasses

        cfg = dataclasses.replace(cfg, data_dir=args.data_dir)
    data = load_for_config(cfg)
    check_classes(state, checkpoint, data, f"the {cfg.dataset} data" + (f" in {cfg.data_dir}" if cfg.data_dir else ""))
    split = getattr(data, args.split)
    whole = split_size(split)
    indices = None
    if args.n_examples is not None:
        if args.n_examples > whole:
            raise ValueError(f"--n-examples {args.n_examples} is larger than the {args.split} split ({whole} images): "
                             f"give at most {whole}, or leave it out to evaluate the whole split")
        indices = balanced_indices(split, args.n_examples, seed=args.seed)
        split = balanced_subset(split, args.n_examples, seed=args.seed)
    eps = cfg.eps if args.eps is None else args.eps
    alpha = cfg.alpha if args.alpha is None else args.alpha
    began = time.perf_counter()
    results = evaluate(model, eval_loader(split, args.batch_size, cfg.num_workers), names, eps=eps, alpha=alpha,
                       num_classes=data.num_classes, device=device, progress=args.progress, steps=args.steps,
                       seed=args.seed, autoattack_version=args.autoattack_version,
                       autoattack_backend=args.autoattack_backend)
    warnings = sanity.check({attack: results.correct(attack) for attack in names})
    unbounded = None
    if args.sanity:
        unbounded, warning = _unbounded(model, split, args, cfg, data, device)
        warnings += [warning] if warning else []
    seconds = time.perf_counter() - began
    logs.info(f"{checkpoint}: {cfg.model} on the {cfg.dataset} {args.split} split ({split_size(split)} images), "
              f"eps={eps:.6g}, alpha={alpha:.6g}, seed {args.seed}")
    logs.info(_summary(results, nonfinite=True))
    if unbounded:
        logs.info(f"unbounded check: {unbounded['attack']} at eps={unbounded['eps']:g}: accuracy "
                  f"{unbounded['average']:.4f} (chance {unbounded['chance']:.4f})")
    for warning in warnings:
        logs.info(f"warning: {warning.message}")
    predictions.save(outputs["predictions"], results, predictions.identity(
        cfg, data, split=args.split, split_size=whole, checkpoint=os.path.abspath(checkpoint), eps=eps,
        alpha=alpha, seed=args.seed), indices=indices)
    logs.info(f"written: {outputs['predictions']}")
    if args.json:
        payload = {
            "checkpoint": os.path.abspath(checkpoint), "model": cfg.model, "dataset": cfg.dataset,
            "split": args.split, "n_examples": split_size(split), "eps": eps, "alpha": alpha, "steps": args.steps,
            "seed": args.seed, "attacks": list(names), "autoattack_version": args.autoattack_version,
            "class_names": list(data.class_names) if data.class_names else None,
            "class_counts": np.bincount(results.labels, minlength=data.num_classes).tolist(), "results": results,
            "sanity": {"warnings": [w.to_dict() for w in warnings], "unbounded": unbounded},
            "versions": _versions("autoattack" in names), "device": str(device),
            "plot": os.path.abspath(outputs["plot"]), "predictions": os.path.abspath(outputs["predictions"]),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "seconds": seconds,
        }
        folder, filename = os.path.split(os.path.abspath(args.json))
        write_metrics(folder, payload, name=filename)
        logs.info(f"written: {args.json}")
    plot_per_class({attack: results[attack]["per_class"] for attack in names}, outputs["plot"],
                   f"per-class {args.split} accuracy ({cfg.model}, eps={eps:.4g})", class_names=data.class_names)
    logs.info(f"written: {outputs['plot']}")
    return 0


def add_runtime(p):
    """Adds the flags every command shares, ``--threads`` and ``--log-file``.

    Args:
        p: an argparse parser or argument group.
    """
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; the demo uses 1, which is fastest for its "
                        "tiny models on a shared machine)")
    p.add_argument("--log-file", default=None, metavar="FILE", help="also append every line (time-stamped) to FILE")


def build_parser(commands=()):
    """Builds the argument parser of the command line.

    Args:
        commands: functions that each add a sub-command to the sub-parsers they are given (the study's
            ``demo`` and ``compare``, from ``fastabsld.study.cli``, which builds on this module). A command sets
            ``func`` (the handler) and may set ``interrupted`` (a function of the parsed arguments returning
            the line printed on Ctrl-C) as parser defaults.

    Returns:
        argparse.ArgumentParser: the parser with its sub-commands.
    """
    import torch

    import fastabsld
    from fastabsld.recipe.options import add_config_arguments

    parser = Parser(prog="fastabsld", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"fastabsld {fastabsld.__version__} (torch {torch.__version__}, "
                                f"extension {'built' if fastabsld.HAS_EXTENSION else 'missing'})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a student (ABSLD, RSLAD) or a PGD-AT model",
                       description="Train with the released ABSLD recipe (SGD, LR and beta x0.1 at 215/260/285 of "
                                   "300 epochs scaled to --epochs); checkpoints every epoch, weights chosen on the "
                                   "validation split, test evaluation at the end. Every TrainConfig field is a flag "
                                   "below; --config FILE sets them from a JSON or TOML file (flags override it). "
                                   "Each epoch's line is printed (and appended to --log-file FILE); with the "
                                   "tensorboard package installed the run folder also gets TensorBoard scalars "
                                   "(tensorboard --logdir RUN_DIR).")
    run = t.add_argument_group("the run")
    run.add_argument("--run-dir", default=None,
                     help="output folder (default: runs/<method>-<dataset>-<model>-seed<N>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --run-dir from its last.pt, with its saved settings; a resume may "
                          "change the epochs, the evaluation period, the test attacks and where it runs, and refuses "
                          "other changes")
    run.add_argument("--config", default=None, metavar="FILE",
                     help="JSON or TOML file of settings (keys: the flags below with _ for -)")
    run.add_argument("--accept-teacher-change", action="store_true",
                     help="with --resume: go on when the teacher's weights differ from those the run was distilled "
                          "from (otherwise an error naming both hashes); metrics.json records the change")
    add_runtime(run)
    add_config_arguments(t.add_argument_group("settings (TrainConfig)"))
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint (best.pt, last.pt or a cached teacher)",
                       description="Evaluate a checkpoint on a split of its data set. Every attack draws its random "
                                   "starts from its own generator, seeded from (--seed, attack name): a figure does "
                                   "not depend on which other attacks run.")
    e.add_argument("checkpoint", help="a checkpoint (best.pt, last.pt, a cached teacher) or a run folder (its best.pt)")
    e.add_argument("--attacks", nargs="+", default=list(EVAL_ATTACKS),
                   help="clean, fgsm, pgd<N>, cw<N> (N steps; bare pgd / cw take --steps) and autoattack "
                        f"(default: {' '.join(EVAL_ATTACKS)})")
    e.add_argument("--steps", type=positive_int, default=None,
                   help="steps of bare pgd / cw names (default: 20); names such as pgd50 carry their own")
    e.add_argument("--split", choices=("test", "val", "train"), default="test", help="(default: test)")
    e.add_argument("--n-examples", type=positive_int, default=None,
                   help="evaluate a class-stratified subset of this many images (as RobustBench's n_ex) "
                        "(default: the whole split)")
    e.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts (default: 0)")
    e.add_argument("--eps", type=_number, default=None, help="override the run's eps (fractions such as 8/255 work)")
    e.add_argument("--alpha", type=_number, default=None, help="override the run's alpha")
    e.add_argument("--autoattack-version", choices=AUTOATTACK_VERSIONS, default="standard",
                   help="(default: standard)")
    e.add_argument("--autoattack-backend", choices=AUTOATTACK_BACKENDS, default="auto",
                   help="the official autoattack package, torchattacks' port, or auto: the official one when it is "
                        "installed (default: auto; the JSON names the one used)")
    e.add_argument("--batch-size", type=positive_int, default=256, help="(default: 256)")
    e.add_argument("--data-dir", default=None, help="the data set's folder, if it moved since training")
    e.add_argument("--json", default=None,
                   help="write the results, sanity warnings, versions and class counts to this JSON file (never over "
                        "a checkpoint or a file of a run folder)")
    e.add_argument("--plot", default=None,
                   help="the per-class accuracy plot (default: beside the --json file as *_per_class.png, else "
                        "beside the checkpoint as <checkpoint>_<split>_per_class.png)")
    e.add_argument("--predictions", default=None, metavar="FILE",
                   help="the per-example results (each example's predicted class under each attack, the labels, "
                        "the split's identity; numpy .npz, read with fastabsld.recipe.predictions.load) (default: "
                        "beside the --json file as *_predictions.npz, else beside the checkpoint as "
                        "<checkpoint>_<split>_predictions.npz)")
    e.add_argument("--sanity", action="store_true",
                   help="also run the unbounded check: PGD with eps the whole input range must bring the accuracy "
                        "down towards 0; above chance, the attack or the model's gradients are broken (a warning). "
                        "The other checks (a stronger attack above a weaker one, PGD equal to FGSM while CW or "
                        "AutoAttack is lower) run on every evaluation, paired on the same examples")
    e.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    add_runtime(e)
    e.set_defaults(func=_eval)

    for add in commands:
        add(sub)
    return parser


def program():
    """How this command line was called: ``fastabsld`` or ``python -m fastabsld``."""
    return "python -m fastabsld" if os.path.basename(sys.argv[0]) == "__main__.py" else "fastabsld"


def _resume_command(args, argv):
    """The exact command that continues an interrupted ``train``."""
    words = [word for word in argv if word != "--resume"]
    if args.run_dir is None:
        words += ["--run-dir", getattr(args, "resolved_run_dir", None) or "RUN_DIR"]
    words.append("--resume")
    launcher = program()
    from fastabsld.recipe.distributed import env_world_size

    if env_world_size() > 1:
        launcher = f"torchrun --nproc_per_node={env_world_size()} -m fastabsld"
    return f"{launcher} {shlex.join(words)}"


def _interrupted(args, argv, status=EXIT_INTERRUPTED):
    if int(os.environ.get("RANK", "0")) != 0:
        return status
    if args.command == "train":
        run_dir = getattr(args, "resolved_run_dir", None) or args.run_dir
        kept = "; last.pt holds the last finished epoch" if run_dir and os.path.exists(
            os.path.join(run_dir, "last.pt")) else ""
        print(f"interrupted{kept}. Resume with: {_resume_command(args, argv)}", file=sys.stderr)
    elif getattr(args, "interrupted", None):
        print(args.interrupted(args), file=sys.stderr)
    else:
        print("interrupted", file=sys.stderr)
    return status


def main(argv=None, commands=()):
    """Runs the command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        commands: further sub-commands (see :func:`build_parser`).

    Returns:
        int: the exit status (0, 2 for an error, 130 when interrupted, 143 on SIGTERM).
    """
    from fastabsld.recipe.distributed import env_world_size

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(commands).parse_args(argv)
    except SystemExit as done:  # --help, --version, or a bad argument (one error line printed already)
        return done.code if isinstance(done.code, int) else EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    args.argv = argv  # for commands that print a command line to run later
    if args.command != "train" and env_world_size() > 1:
        return _error(f"only 'train' runs under torchrun; run '{args.command}' as a single process")
    from fastabsld.recipe import logs

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(logs.setup(args.log_file))  # error lines too reach the log file
        except (ValueError, OSError) as error:  # --log-file names a folder or an unwritable place
            return _error(str(error))
        try:
            stack.enter_context(_sigterm_unwinds())
            if getattr(args, "device", None) is not None:
                from fastabsld.recipe.runtime import resolve_device

                resolve_device(args.device)
            return args.func(args)
        except KeyboardInterrupt as interrupt:
            return _interrupted(args, argv, EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED)
        except (ValueError, OSError, ImportError) as error:  # bad values, files, folders, missing packages
            if os.environ.get("FASTABSLD_TRACEBACK"):
                raise
            return _error(" ".join(str(error).split()) or type(error).__name__)
