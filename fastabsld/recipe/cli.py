"""The ``fastabsld`` command line: ``train``, ``eval`` and ``demo``.

Examples:
  fastabsld demo                                   # RSLAD vs ABSLD on digits, CPU, a few minutes
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
                                            "on_nonfinite")}
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
