"""The command line of compare's launchers: ``--launcher local|slurm``, the SLURM job options, waiting, collecting."""

import argparse
import shlex

from fastabsld.study.slurm import SlurmOptions, parse_sbatch_option

LAUNCHERS = ("local", "slurm")
# Flags that say how this call treats the jobs, not what the study is: the collect command drops them.
_CALL_FLAGS = ("--no-wait", "--collect", "--resubmit")


def _count(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def _gigabytes(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number of GB, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of GB, got {text!r}")
    return value


def _sbatch(text):
    try:
        return parse_sbatch_option(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_launcher_arguments(parser):
    """Adds ``--launcher`` and the SLURM options (a group of their own) to compare's parser.

    Args:
        parser: the ``compare`` subparser.
    """
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="where the runs train: local (processes of this machine, --jobs at once) or slurm "
                             "(a job array on a SLURM cluster through submitit) (default: local)")
    g = parser.add_argument_group(
        "SLURM launcher (--launcher slurm)",
        "Each run is a task of a job array; an uncached teacher is trained first by a job the array depends on. "
        "A job reaching its time limit or preempted is requeued and resumes its run from last.pt. The runs, the "
        "teacher cache and the logs must be on a file system the nodes share.")
    defaults = SlurmOptions()
    g.add_argument("--partition", default=None, help="partition of the jobs (default: the cluster's)")
    g.add_argument("--gpus-per-run", type=_count(0), default=defaults.gpus_per_run,
                   help="GPUs per run (default: 0; ask for 1 and --device cuda on a GPU partition)")
    g.add_argument("--cpus-per-run", type=_count(1), default=defaults.cpus_per_run,
                   help=f"CPUs per run, also its torch threads (default: {defaults.cpus_per_run})")
    g.add_argument("--mem-per-run", type=_gigabytes, default=None, metavar="GB",
                   help="memory per run in GB (default: the partition's)")
    g.add_argument("--time", type=_count(1), default=defaults.time_min, metavar="MINUTES",
                   help=f"time limit of each job; a run reaching it is requeued and resumes (default: "
                        f"{defaults.time_min})")
    g.add_argument("--account", default=None, help="account to charge (default: yours)")
    g.add_argument("--qos", default=None, help="quality of service (default: the cluster's)")
    g.add_argument("--array-parallelism", type=_count(0), default=0, metavar="N",
                   help="runs of the array running at once (default: 0, as many as the cluster gives)")
    g.add_argument("--sbatch", type=_sbatch, action="append", default=[], metavar="KEY=VALUE",
                   help="a further sbatch option, e.g. --sbatch constraint=a100 (repeatable)")
    g.add_argument("--slurm-logs", default=None, metavar="DIR",
                   help="folder of the jobs' logs and submitit's files (default: OUT/slurm)")
    g.add_argument("--max-requeues", type=_count(0), default=defaults.max_requeues, metavar="N",
                   help=f"times a job is requeued after reaching its time limit (default: {defaults.max_requeues})")
    g.add_argument("--poll", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between two looks at the jobs' states (default: 10)")
    g.add_argument("--no-wait", action="store_true",
                   help="submit, show the jobs' states and return with the command that collects the runs later")
    g.add_argument("--collect", action="store_true",
                   help="submit nothing: find the jobs submitted before, wait for them (unless --no-wait), read the "
                        "finished runs and name the missing or failed ones")
    g.add_argument("--resubmit", action="store_true",
                   help="submit again the runs whose job failed or was cancelled, and those never submitted; they "
                        "resume from their last.pt")


def collect_command(program, argv):
    """The command that collects a SLURM compare later: the same study with ``--collect``.

    Args:
        program: how the command line is called (``fastabsld`` or ``python -m fastabsld``).
        argv: this call's arguments.

    Returns:
        str: the shell command.
    """
    words = [word for word in argv if word not in _CALL_FLAGS]
    return f"{program} {shlex.join(words + ['--collect'])}"


def launcher_from_args(args, program, argv):
    """The launcher compare's arguments ask for (None: the local one, built by compare from --jobs).

    Args:
        args: the parsed ``compare`` arguments.
        program: how the command line is called.
        argv: this call's arguments (for the collect command).

    Returns:
        SlurmLauncher or None.

    Raises:
        ValueError: SLURM options given to the local launcher, or --collect with --resubmit.
    """
    slurm_only = [flag for flag, given in (("--no-wait", args.no_wait), ("--collect", args.collect),
                                           ("--resubmit", args.resubmit)) if given]
    if args.launcher == "local":
        if slurm_only:
            raise ValueError(f"{', '.join(slurm_only)} only apply to --launcher slurm")
        return None
    from fastabsld.study.slurm import SlurmLauncher

    if not args.poll > 0:
        raise ValueError(f"--poll must be a positive number of seconds, got {args.poll}")
    options = SlurmOptions(partition=args.partition, gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
                           mem_gb=args.mem_per_run, time_min=args.time, account=args.account, qos=args.qos,
                           array_parallelism=args.array_parallelism, sbatch=dict(args.sbatch), logs=args.slurm_logs,
                           max_requeues=args.max_requeues)
    return SlurmLauncher(args.out, options, wait=not args.no_wait, collect=args.collect, resubmit=args.resubmit,
                         collect_command=collect_command(program, argv), poll_s=args.poll)
