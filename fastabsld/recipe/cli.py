"""The ``fastabsld`` command line: ``train``, ``eval``, ``demo`` and ``compare``.

Examples:
  fastabsld demo                                   # RSLAD vs ABSLD on digits, CPU, a few minutes
  fastabsld compare pgd-at trades ard rslad absld absld+reweight --seeds 0 1 2
                                                   # methods x seeds on digits, one table
  fastabsld train --method absld --epochs 30 --run-dir runs/absld
  fastabsld train --run-dir runs/absld --resume    # continue a killed run
  fastabsld eval runs/absld/best.pt --attacks clean pgd20 cw
  fastabsld train --dataset cifar10 --data-dir data --epochs 300 --device cuda \\
      --teacher-path wrn-34-10-trades.pt
  torchrun --nproc_per_node=4 -m fastabsld train --dataset cifar10 --device cuda --batch-size 128 ...
                                                   # 4 GPUs, 32 images per GPU per step
"""

import argparse
import contextlib
import math
import os
import pickle
import sys

from fastabsld.methods.absld import TEMPERATURE_MODES
from fastabsld.evaluation import ATTACKS

EPS_HELP = ("L-inf radius of the attacks (default: 0.1 on digits, 8/255 on CIFAR). The digits images are 8x8 with "
            "17 grey levels (steps of 1/16 = 0.0625); eps = 0.1 moves each pixel by at most 1.6 grey levels, which "
            "keeps the digit legible to a person, yet it is a real threat: the cnn-s student trained without defence "
            "falls from 99.6%% clean to 30%% under PGD-20 (its worst class to 4%%). 8/255, the CIFAR value, is half a "
            "grey level on digits and leaves that model at 95%%: too little to defend against.")


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _set_threads(threads):
    import torch

    if threads:
        torch.set_num_threads(threads)


def _train(args):
    from fastabsld.recipe import distributed

    _set_threads(args.threads)
    with distributed.session(args.device) as ctx:
        return _train_in(args, ctx)


def train_config(args):
    """The TrainConfig that ``fastabsld train`` runs with these parsed arguments.

    Args:
        args: the namespace from :func:`build_parser` for the ``train`` command.

    Returns:
        TrainConfig: the config (validated).

    Raises:
        ValueError: a bad value, naming the setting.
    """
    from fastabsld.recipe.config import TrainConfig

    fields = {k: getattr(args, k) for k in ("method", "dataset", "model", "teacher_model", "epochs", "batch_size",
                                            "lr", "eps", "alpha", "steps", "beta", "temperature_mode", "seed",
                                            "split_seed", "train_subset", "eval_every", "select_metric",
                                            "teacher_epochs", "teacher_path", "device", "data_dir", "sync_bn",
                                            "on_nonfinite", "reweight")}
    fields.update(_method_options(args))
    if args.test_attacks:
        fields["test_attacks"] = tuple(args.test_attacks)
    if args.cache_dir:
        fields["cache_dir"] = args.cache_dir
    return TrainConfig(**fields, **_speed_options(args), progress=not args.no_progress)


def _train_in(args, ctx):
    from fastabsld.recipe import lock, logs
    from fastabsld.recipe.errors import RecipeError

    try:
        cfg = train_config(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or os.path.join("runs", f"{cfg.method}-{cfg.dataset}-{cfg.model}-seed{cfg.seed}")
    try:  # rank 0 holds the run folder from before it looks into it until the run ends
        with lock.hold(run_dir) if ctx.is_main else contextlib.nullcontext():
            return _train_run(args, ctx, cfg, run_dir)
    except RecipeError as error:  # a folder in use, no usable checkpoint, a non-finite loss
        logs.error(f"error: {error}")
        return error.exit_status


def _train_run(args, ctx, cfg, run_dir):
    from fastabsld.recipe import checkpoint, logs
    from fastabsld.recipe.config import RUNTIME_FIELDS, TrainConfig
    from fastabsld.recipe.train import train

    last = os.path.join(run_dir, "last.pt")
    exists = os.path.exists(last) or os.path.exists(checkpoint.previous_path(last))
    ctx.barrier()  # every rank has looked before rank 0 can write last.pt
    if exists:
        if not args.resume:
            print(f"error: {run_dir} holds a run already; pass --resume to continue it or choose another --run-dir",
                  file=sys.stderr)
            return 2
        # A resumed run keeps its recipe; only where it runs may change.
        saved = checkpoint.load_latest(last)[0]["config"]
        cfg = TrainConfig(**{**saved, **{k: v for k, v in cfg.to_dict().items() if k in RUNTIME_FIELDS}})
        if ctx.is_main:
            logs.info(f"resuming {run_dir} with its saved configuration ({cfg.method}, {cfg.epochs} epochs)")
    result = train(cfg, run_dir, resume=args.resume)
    if not ctx.is_main:
        return 0
    logs.info(_summary(result["test"]))
    logs.info(f"best epoch on validation: {result['best']['epoch']} "
              f"({cfg.select_metric} = {result['best']['value']:.4f})")
    logs.info(f"run folder: {run_dir} (metrics.json, best.pt, last.pt, plots)")
    return 0


def _summary(test):
    def cell(value):
        return f"{'n/a':>8}" if value is None or math.isnan(value) else f"{value:>8.4f}"

    lines = [f"{'attack':<12} {'average':>8} {'worst':>8} {'NSD':>8}"]
    for attack, m in test.items():
        lines.append(f"{attack:<12} {cell(m['average'])} {cell(m['worst'])} {cell(m['nsd'])}")
    return "\n".join(lines)


def _eval(args):
    from fastabsld.evaluation import evaluate
    from fastabsld.recipe.checkpoint import CheckpointError, load_model
    from fastabsld.recipe.data import TensorLoader, load_dataset
    from fastabsld.recipe.runtime import resolve_device

    _set_threads(args.threads)
    device = resolve_device(args.device)
    try:
        model, cfg = load_model(args.checkpoint, device)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, RuntimeError) as error:
        print(f"error: {args.checkpoint} is not a fastabsld checkpoint ({type(error).__name__}: {error})",
              file=sys.stderr)
        return 2
    data = load_dataset(cfg.dataset, data_dir=args.data_dir or cfg.data_dir, seed=cfg.split_seed)
    x, y = getattr(data, args.split)
    eps = cfg.eps if args.eps is None else args.eps
    alpha = cfg.alpha if args.alpha is None else args.alpha
    results = evaluate(model, TensorLoader(x, y, args.batch_size), tuple(args.attacks), eps=eps, alpha=alpha,
                       num_classes=data.num_classes, device=device, progress=not args.no_progress)
    from fastabsld.recipe import logs

    logs.info(f"{args.checkpoint}: {cfg.model} on the {cfg.dataset} {args.split} split ({len(y)} images), eps={eps}")
    logs.info(_summary(results))
    if args.json:
        from fastabsld.recipe.report import write_metrics

        folder, name = os.path.split(os.path.abspath(args.json))
        write_metrics(folder, {"checkpoint": args.checkpoint, "split": args.split, "eps": eps, "alpha": alpha,
                               "results": results}, name=name)
        logs.info(f"written: {args.json}")
    return 0


def _demo(args):
    from fastabsld.recipe.demo import run_demo

    _set_threads(args.threads)
    run_demo(args.out, seeds=tuple(args.seeds), epochs=args.epochs, teacher_epochs=args.teacher_epochs,
             cache_dir=args.cache_dir, device=args.device, progress=not args.no_progress, speed=_speed_options(args))
    return 0


def _method_options(args):
    return {name: getattr(args, name) for name in _METHOD_FLAGS if getattr(args, name) is not None}


# The methods' hyper-parameters and the teacher's method: flags of train and compare (None: TrainConfig's default).
_METHOD_FLAGS = {
    "teacher_method": (str, "how a teacher trained here is trained: pgd-at or trades (default: pgd-at)"),
    "trades_beta": (float, "weight of the TRADES KL term, for --method trades and a TRADES teacher (default: 6)"),
    "ard_temperature": (float, "ARD's distillation temperature (default: 30)"),
    "ard_alpha": (float, "ARD's weight of the distillation term; 1 - it weighs the clean CE (default: 1)"),
    "iad_temperature": (float, "IAD's temperature of the teacher term (default: 1)"),
    "iad_alpha": (float, "IAD's weight of the distillation terms; 1 - it weighs the clean CE (default: 1)"),
    "iad_beta": (float, "IAD's exponent of the teacher's true-class probability (default: 0.1)"),
    "iad_warmup": (float, "IAD's warm-up (plain ARD) as a fraction of the epochs (default: 0.3, 60 of 200)"),
    "reweight_beta": (float, "exponent of the inverse robust time in the Fair-ARD class weights (default: 2)"),
    "reweight_min": (float, "lower clamp of the Fair-ARD class weights (default: 5/6)"),
    "reweight_max": (float, "upper clamp of the Fair-ARD class weights (default: 5/2)"),
}


def _add_method_options(p):
    from fastabsld.recipe.config import TEACHER_METHODS

    for name, (kind, text) in _METHOD_FLAGS.items():
        extra = {"choices": TEACHER_METHODS} if name == "teacher_method" else {}
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text, **extra)


def _compare(args):
    from fastabsld.recipe.compare import compare

    _set_threads(args.threads)
    config = {k: getattr(args, k) for k in ("dataset", "model", "teacher_model", "epochs", "teacher_epochs",
                                            "batch_size", "lr", "eps", "alpha", "steps", "train_subset", "eval_every",
                                            "teacher_path", "data_dir", "cache_dir", "device")
              if getattr(args, k) is not None}
    config.update(_method_options(args), **_speed_options(args), progress=False)
    try:
        compare(args.out, methods=args.methods, seeds=args.seeds, attacks=args.attacks, reference=args.reference,
                config=config, jobs=args.jobs, threads=args.threads)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


COMPARE_HELP = ("Trains every method spec with every seed under one budget on one data set, distilling from one "
                "cached robust teacher, each run in its own folder of --out (a run finished there is reused, an "
                "interrupted one resumed); evaluates the kept weights on the test split and prints, per method and "
                "attack, the average and worst-class accuracy and NSD as mean +- std over the seeds, with each "
                "method's paired difference (same seed) from --reference, judged against the seed spread as the "
                "demo judges it. Writes compare.json and compare.png into --out. A spec is a method, or a "
                "distillation method followed by +reweight (Fair-ARD's per-class re-weighting), e.g. "
                "absld+reweight. The defaults (6 methods x 3 seeds of 30 epochs on digits, --jobs 2, the teacher "
                "included) took 6.0 and 6.7 min in two measurements on 2 CPU cores; with --jobs 1 about twice that. AutoAttack "
                "(--attacks ... autoattack) adds about 2.5 min per run on digits (its Square attack's 5000 "
                "queries), so it is not among the defaults.")


def _speed_options(args):
    return {"amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
            "fold_bn": not args.no_fold_bn}


def _add_speed(p):
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast around the student's and teacher's forwards (losses stay fp32)")
    p.add_argument("--channels-last", action="store_true", help="models and batches in channels_last")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the student's training forward and the attack's forward")
    p.add_argument("--no-fold-bn", action="store_true",
                   help="attack the student itself rather than its eval view with BatchNorm folded into the convs")


def _add_common(p):
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; the demo uses 1, which is fastest for its "
                        "tiny models on a shared machine)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide progress bars (they are drawn only when standard error is a terminal)")
    p.add_argument("--log-file", default=None, help="also append every line (time-stamped) to this file")


def build_parser():
    """Builds the argument parser of the command line.

    Returns:
        argparse.ArgumentParser: the parser with its sub-commands.
    """
    from fastabsld.recipe.config import METHODS
    from fastabsld.recipe.data import DATASETS
    from fastabsld.recipe.models import MODELS

    parser = argparse.ArgumentParser(prog="fastabsld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a student (ABSLD, RSLAD) or a PGD-AT model",
                       description="Train with the released ABSLD recipe (SGD, LR and beta x0.1 at 215/260/285 of "
                                   "300 epochs scaled to --epochs); checkpoints every epoch, weights chosen on the "
                                   "validation split, test evaluation at the end.")
    t.add_argument("--method", choices=METHODS, default="absld")
    t.add_argument("--dataset", choices=DATASETS, default="digits")
    t.add_argument("--model", choices=sorted(MODELS), default=None, help="student (default: cnn-s / resnet18)")
    t.add_argument("--teacher-model", choices=sorted(MODELS), default=None,
                   help="teacher (default: cnn-l / wrn-34-10)")
    t.add_argument("--teacher-path", default=None, help="teacher checkpoint to use instead of training one")
    t.add_argument("--teacher-epochs", type=_positive_int, default=40, help="PGD-AT epochs of a teacher to train")
    t.add_argument("--epochs", type=_positive_int, default=30)
    t.add_argument("--batch-size", type=_positive_int, default=128,
                   help="global batch size; under torchrun each of the N processes takes batch-size / N images "
                        "per step (must divide evenly) (default: 128)")
    t.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, normalise BatchNorm with the statistics of the global batch "
                        "(SyncBatchNorm, CUDA only); without it each process uses its own batch-size / N images")
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--eps", type=float, default=None, help=EPS_HELP)
    t.add_argument("--alpha", type=float, default=None,
                   help="PGD step size (default: eps / 4 on digits, 2/255 on CIFAR)")
    t.add_argument("--steps", type=int, default=10, help="PGD steps of the inner maximisation (default: 10)")
    t.add_argument("--beta", type=float, default=0.1, help="temperature learning rate of ABSLD (default: 0.1)")
    t.add_argument("--reweight", action="store_true",
                   help="Fair-ARD's per-class re-weighting of a distillation method (ard, iad, rslad, absld)")
    _add_method_options(t)
    t.add_argument("--temperature-mode", choices=TEMPERATURE_MODES, default="paper",
                   help="'released' reproduces the released script's tau_adv*tau_nat aliasing")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split")
    t.add_argument("--train-subset", type=_positive_int, default=None, help="use only N training images")
    t.add_argument("--eval-every", type=_positive_int, default=1, help="validation evaluation period in epochs")
    t.add_argument("--select-metric", default="pgd20.average",
                   help="validation metric choosing the kept weights: <clean|pgd20>.<average|worst> "
                        "(default: pgd20.average)")
    t.add_argument("--test-attacks", nargs="+", default=None,
                   help="final test attacks (default: clean fgsm pgd20 cw; add autoattack if torchattacks is "
                        "installed)")
    t.add_argument("--run-dir", default=None, help="output folder (default: runs/<method>-<dataset>-<model>-seed<N>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last.pt")
    t.add_argument("--data-dir", default=None, help="CIFAR folder in the python pickle format (default: ./data)")
    t.add_argument("--cache-dir", default=None, help="teacher cache (default: $FASTABSLD_CACHE or .fastabsld_cache)")
    t.add_argument("--on-nonfinite", choices=("stop", "warn"), default="stop",
                   help="a NaN or infinite training loss stops the run with an error, keeping the last finite "
                        "checkpoint (stop, the default), or is a warning line (warn)")
    _add_speed(t)
    _add_common(t)
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint (best.pt, last.pt or a cached teacher)")
    e.add_argument("checkpoint")
    e.add_argument("--attacks", nargs="+", default=["clean", "fgsm", "pgd20", "cw"], choices=ATTACKS,
                   help="any of clean fgsm pgd20 cw autoattack")
    e.add_argument("--split", choices=("test", "val", "train"), default="test")
    e.add_argument("--eps", type=float, default=None, help="override the run's eps")
    e.add_argument("--alpha", type=float, default=None, help="override the run's alpha")
    e.add_argument("--batch-size", type=_positive_int, default=256)
    e.add_argument("--data-dir", default=None)
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    _add_common(e)
    e.set_defaults(func=_eval)

    d = sub.add_parser("demo", help="RSLAD vs ABSLD on digits on the CPU (a few minutes)",
                       description="Trains (or reuses) a robust digits teacher, distils RSLAD and ABSLD students "
                                   "with the same budget and seeds, and prints a side-by-side table of clean and "
                                   "PGD-20 accuracy, worst-class accuracy and NSD with mean +- std over seeds.")
    d.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="student seeds (default: 0 1 2 3 4; about 20 s per seed for both methods on 2 cores)")
    d.add_argument("--epochs", type=_positive_int, default=30, help="student epochs")
    d.add_argument("--teacher-epochs", type=_positive_int, default=30)
    d.add_argument("--out", default=os.path.join("runs", "demo"), help="report folder")
    d.add_argument("--cache-dir", default=None)
    _add_speed(d)
    _add_common(d)
    d.set_defaults(func=_demo, threads=1)

    from fastabsld.recipe import compare as compare_mod

    c = sub.add_parser("compare", help="several methods x seeds on one data set and teacher, one table",
                       description=COMPARE_HELP)
    c.add_argument("methods", nargs="*", default=list(compare_mod.DEFAULT_METHODS), metavar="METHOD",
                   help=f"method specs (default: {' '.join(compare_mod.DEFAULT_METHODS)}); methods: "
                        f"{', '.join(METHODS)}")
    c.add_argument("--seeds", type=int, nargs="+", default=list(compare_mod.DEFAULT_SEEDS),
                   help="seeds of every method (default: 0 1 2)")
    c.add_argument("--attacks", nargs="+", default=list(compare_mod.DEFAULT_ATTACKS), choices=ATTACKS,
                   help=f"test attacks (default: {' '.join(compare_mod.DEFAULT_ATTACKS)})")
    c.add_argument("--reference", default=compare_mod.DEFAULT_REFERENCE,
                   help=f"the spec the paired differences are taken from (default: {compare_mod.DEFAULT_REFERENCE})")
    c.add_argument("--out", default=os.path.join("runs", "compare"), help="report folder (default: runs/compare)")
    c.add_argument("--jobs", type=_positive_int, default=2, help="runs trained at once, one process each (default: 2)")
    c.add_argument("--dataset", choices=DATASETS, default=None, help="data set (default: digits)")
    c.add_argument("--model", choices=sorted(MODELS), default=None, help="student (default: the data set's)")
    c.add_argument("--teacher-model", choices=sorted(MODELS), default=None, help="teacher (default: the data set's)")
    c.add_argument("--teacher-path", default=None, help="teacher checkpoint to use instead of training one")
    c.add_argument("--epochs", type=_positive_int, default=None, help="epochs of every run (default: 30)")
    c.add_argument("--teacher-epochs", type=_positive_int, default=None, help="epochs of a teacher to train (30)")
    c.add_argument("--batch-size", type=_positive_int, default=None, help="batch size (default: 128)")
    c.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: 0.1)")
    c.add_argument("--eps", type=float, default=None, help="L-inf radius (default: 0.1 on digits, 8/255 on CIFAR)")
    c.add_argument("--alpha", type=float, default=None, help="PGD step size (default: eps / 4 on digits, 2/255)")
    c.add_argument("--steps", type=int, default=None, help="PGD steps of the inner maximisation (default: 10)")
    c.add_argument("--train-subset", type=_positive_int, default=None, help="use only N training images")
    c.add_argument("--eval-every", type=_positive_int, default=None, help="validation period in epochs (default: 5)")
    c.add_argument("--data-dir", default=None, help="CIFAR folder")
    c.add_argument("--cache-dir", default=None, help="teacher cache (default: $FASTABSLD_CACHE or .fastabsld_cache)")
    _add_method_options(c)
    _add_speed(c)
    _add_common(c)
    c.set_defaults(func=_compare, threads=1)
    return parser


def main(argv=None):
    """Runs the command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        int: the exit status.
    """
    from fastabsld.recipe.distributed import env_world_size

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command != "train" and env_world_size() > 1:
        print(f"error: only 'train' runs under torchrun; run '{args.command}' as a single process", file=sys.stderr)
        return 2
    if getattr(args, "device", None) is not None:
        from fastabsld.recipe.runtime import resolve_device

        try:
            resolve_device(args.device)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    from fastabsld.recipe import logs

    try:
        with logs.setup(args.log_file):
            return args.func(args)
    except OSError as error:  # a missing checkpoint, teacher or data folder, or a failed download
        print(f"error: {error}", file=sys.stderr)
        return 2
