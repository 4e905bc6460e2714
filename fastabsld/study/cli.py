"""The ``fastabsld`` program: the recipe's ``train`` and ``eval`` (``fastabsld.recipe.cli``) with the study's
``demo`` and ``compare``.

``main`` here is the entry point of ``fastabsld`` and ``python -m fastabsld``; the recipe's command line
knows nothing of the study and takes its commands as :func:`add_demo` and :func:`add_compare`.
"""

import argparse
import dataclasses
import os

from fastabsld.recipe import cli as recipe_cli

# The settings compare sets per run (the specs, seeds and attacks) or itself (no progress bars in the workers).
COMPARE_OWN_FIELDS = ("method", "reweight", "seed", "test_attacks", "progress")

COMPARE_HELP = ("Trains every method spec with every seed under one budget on one data set, distilling from one "
                "cached robust teacher, each run in its own folder of --out (a run finished there is reused, an "
                "interrupted one resumed); evaluates the kept weights and the teacher on the test split and prints, "
                "per method and attack, the average and worst-class accuracy and NSD as the mean over the seeds with "
                "a 95%% interval, and each method's paired difference from --reference (same seeds, same test "
                "images) with a 95%% interval, from a hierarchical bootstrap (seeds, from 3 of them, then test "
                "images within each class). 'better' or 'worse' only when the difference is significant after "
                "Holm's correction over the table; otherwise 'no detectable difference'. Fewer than 3 seeds: a "
                "warning that the intervals cover the evaluation noise only. Students still improving at their "
                "last epoch, or far below the teacher's clean accuracy, are flagged. Writes compare.json (figures, "
                "intervals, p-values, verdicts) and compare.png into --out. A spec is a method, or a distillation "
                "method followed by +reweight (Fair-ARD's per-class re-weighting), e.g. absld+reweight. The "
                "defaults with --eval-every 5 (6 methods x 3 seeds of 30 epochs on digits, --jobs 2, the teacher "
                "included) took 6.0, 6.7 and 6.0 min in three measurements on 2 CPU cores; with --jobs 1 about "
                "twice that. AutoAttack (--attacks ... autoattack) adds about 2.5 min per run on digits (its "
                "Square attack's 5000 queries), so it is not among the defaults. With --launcher slurm each run is "
                "a job of a SLURM job array (see the SLURM launcher's options below); --no-wait and --collect leave "
                "and pick up the jobs.")


def _demo(args):
    from fastabsld.recipe.options import given_settings
    from fastabsld.study.demo import run_demo

    recipe_cli.set_threads(args.threads)
    speed = {k: v for k, v in given_settings(args).items() if k in ("amp", "channels_last", "compile", "fold_bn")}
    run_demo(args.out, seeds=tuple(args.seeds), epochs=args.epochs, teacher_epochs=args.teacher_epochs,
             cache_dir=args.cache_dir, device=args.device, progress=args.progress, speed=speed)
    return 0


def _compare(args):
    from fastabsld.recipe.options import requested_settings
    from fastabsld.study.compare import compare
    from fastabsld.study.launcher_options import launcher_from_args

    recipe_cli.set_threads(args.threads)
    config = {**requested_settings(args), "progress": False}  # each run's epoch lines go to its train.log
    launcher = launcher_from_args(args, recipe_cli.program(), args.argv)
    compare(args.out, methods=args.methods, seeds=args.seeds, attacks=args.attacks, reference=args.reference,
            config=config, jobs=args.jobs, threads=args.threads, launcher=launcher)
    return 0


def _demo_interrupted(args):
    return "interrupted; the cached teacher is kept, run the same command again to redo the demo"


def _compare_interrupted(args):
    if args.launcher == "slurm":
        return "interrupted; the SLURM jobs keep running (collect them as said above)"
    return (f"interrupted; the finished runs in {args.out} are kept and the interrupted ones resume from their "
            "last epoch: run the same command again to continue")


def add_demo(sub):
    """Adds the ``demo`` command.

    Args:
        sub: the sub-parsers of the ``fastabsld`` parser.
    """
    from fastabsld.recipe.config import DEFAULT_TEACHER_EPOCHS
    from fastabsld.recipe.options import add_config_arguments

    d = sub.add_parser("demo", help="RSLAD vs ABSLD on digits on the CPU (a few minutes)",
                       description="Trains (or reuses) a robust digits teacher, distils RSLAD and ABSLD students "
                                   "with the same budget and seeds (validated every epoch, as train by default), "
                                   "and prints the teacher's and the students' clean, FGSM and PGD-20 accuracy, "
                                   "worst-class accuracy and NSD: the mean over seeds with a 95%% interval and the "
                                   "paired ABSLD - RSLAD difference with its interval and a Holm-corrected verdict, "
                                   "as compare does. Seeds must be distinct.")
    d.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="student seeds, distinct; 3 or more for intervals that cover the training noise "
                        "(default: 0 1 2 3 4)")
    d.add_argument("--epochs", type=recipe_cli.positive_int, default=30, help="student epochs (default: 30)")
    d.add_argument("--teacher-epochs", type=recipe_cli.positive_int, default=DEFAULT_TEACHER_EPOCHS,
                   help=f"(default: {DEFAULT_TEACHER_EPOCHS}, as for train: both share the cached teacher)")
    d.add_argument("--out", default=os.path.join("runs", "demo"), help="report folder (default: runs/demo)")
    d.add_argument("--cache-dir", default=None, help="teacher cache (default: $FASTABSLD_CACHE or .fastabsld_cache)")
    d.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    add_config_arguments(d, ("amp", "channels_last", "compile", "fold_bn"))
    recipe_cli.add_runtime(d)
    d.set_defaults(func=_demo, threads=1, interrupted=_demo_interrupted)


def add_compare(sub):
    """Adds the ``compare`` command.

    Args:
        sub: the sub-parsers of the ``fastabsld`` parser.
    """
    from fastabsld.recipe.config import METHODS, TrainConfig
    from fastabsld.recipe.options import add_config_arguments, flag
    from fastabsld.study import compare as compare_mod

    c = sub.add_parser("compare", help="several methods x seeds on one data set and teacher, one table",
                       description=COMPARE_HELP)
    c.add_argument("methods", nargs="*", default=list(compare_mod.DEFAULT_METHODS), metavar="METHOD",
                   help=f"method specs (default: {' '.join(compare_mod.DEFAULT_METHODS)}); methods: "
                        f"{', '.join(METHODS)}")
    c.add_argument("--seeds", type=int, nargs="+", default=list(compare_mod.DEFAULT_SEEDS),
                   help="seeds of every method, distinct; 3 or more for intervals that cover the training noise "
                        "(default: 0 1 2)")
    c.add_argument("--attacks", nargs="+", default=list(compare_mod.DEFAULT_ATTACKS),
                   help="test attacks: clean, fgsm, pgd<N>, cw<N>, autoattack "
                        f"(default: {' '.join(compare_mod.DEFAULT_ATTACKS)})")
    c.add_argument("--reference", default=compare_mod.DEFAULT_REFERENCE,
                   help=f"the spec the paired differences are taken from (default: {compare_mod.DEFAULT_REFERENCE})")
    c.add_argument("--out", default=os.path.join("runs", "compare"), help="report folder (default: runs/compare)")
    c.add_argument("--jobs", type=recipe_cli.positive_int, default=2,
                   help="runs trained at once, one process each (default: 2)")
    c.add_argument("--config", default=None, metavar="FILE",
                   help="JSON or TOML file of the runs' settings, as for train (flags override it)")
    recipe_cli.add_runtime(c)
    shared = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in COMPARE_OWN_FIELDS]
    add_config_arguments(c.add_argument_group(
        "settings of every run (TrainConfig; compare's defaults: "
        f"{', '.join(f'{flag(k)} {v}' for k, v in compare_mod.DEFAULTS.items())})"), shared)
    from fastabsld.study.launcher_options import add_launcher_arguments

    add_launcher_arguments(c)
    c.set_defaults(func=_compare, threads=1, interrupted=_compare_interrupted)


COMMANDS = (add_demo, add_compare)


def build_parser():
    """The parser of the ``fastabsld`` program: the recipe's commands and the study's.

    Returns:
        argparse.ArgumentParser: the parser.
    """
    return recipe_cli.build_parser(COMMANDS)


def main(argv=None):
    """Runs the ``fastabsld`` program.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        int: the exit status (0, 2 for an error, 130 when interrupted).
    """
    return recipe_cli.main(argv, COMMANDS)
