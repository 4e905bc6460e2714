"""One rank of a short digits training run, launched like torchrun does (RANK, WORLD_SIZE, MASTER_* in the env).

``python -m tests.recipe.dist_worker SPEC_JSON``; SPEC holds ``data`` (a ``torch.save``d digits Splits: loading
it skips the seconds of importing scikit-learn), ``config`` (TrainConfig fields), ``run_dir``,
``out`` (a folder for this rank's result file), optionally ``resume`` and ``stop_after`` (raise
after that many epochs, on every rank, as a killed job would stop); or ``argv``: run the command
line ``fastabsld <argv>`` instead (the result of its ``train`` call is kept). Without WORLD_SIZE in the
environment it runs alone (used in-process by the tests for the single-process reference).
"""

import json
import os
import sys

import torch
from torch import nn

from fastabsld.recipe import checkpoint, cli, distributed, report
from fastabsld.recipe import train as train_module
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.models import MODELS, build_model

# A BatchNorm-free student: with it a DDP run must equal the single-process run (see fastabsld.recipe.distributed).
PLAIN_MODEL = "mlp-test"


def plain_model(num_classes, in_channels):
    """A two-layer perceptron for 8x8 digits (no BatchNorm).

    Args:
        num_classes: outputs.
        in_channels: input channels.

    Returns:
        nn.Module: the model.
    """
    return nn.Sequential(nn.Flatten(), nn.Linear(64 * in_channels, 32), nn.ReLU(), nn.Linear(32, num_classes))


def teacher():
    """The fixed, untrained teacher of the distributed tests (same weights in every process)."""
    torch.manual_seed(123)
    return build_model("cnn-s", 10, 1).eval()


class Stop(Exception):
    """Raised on every rank after ``stop_after`` epochs (a simulated kill)."""


def run(spec, rank=0):
    """Trains as ``spec`` says; writes ``rank<r>.pt`` (history, final weights, files written) into ``spec['out']``.

    Args:
        spec: the run's description (see the module doc).
        rank: used only to name the result file when running alone.
    """
    MODELS.setdefault(PLAIN_MODEL, plain_model)
    writes = []
    for module, name in ((checkpoint, "atomic_save"), (report, "write_metrics"), (report, "plot_run")):
        original = getattr(module, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            writes.append(_name)
            return _original(*args, **kwargs)

        setattr(module, name, recording)
    epoch_ends = [0]
    barrier = distributed.Context.barrier

    def counting_barrier(ctx):
        barrier(ctx)
        epoch_ends[0] += 1
        if spec.get("stop_after") and epoch_ends[0] == spec["stop_after"]:
            raise Stop()

    distributed.Context.barrier = counting_barrier
    data = torch.load(spec["data"], weights_only=False)
    train_module.load_dataset = lambda *args, **kwargs: data
    rank = int(os.environ.get("RANK", rank))
    try:
        with distributed.session("cpu"):
            result = _command(spec) if "argv" in spec else train_module.train(
                TrainConfig(**spec["config"]), spec["run_dir"], resume=spec.get("resume", False),
                teacher=teacher(), data=data, log=lambda *_: None)
    except Stop:
        # The session must have destroyed the process group on the way out.
        torch.save({"initialized": torch.distributed.is_initialized()}, os.path.join(spec["out"], f"stop{rank}.pt"))
        return
    model = {k: v.clone() for k, v in result["model"].state_dict().items()}
    torch.save({"rank": rank, "history": result["history"], "model": model, "writes": writes},
               os.path.join(spec["out"], f"rank{rank}.pt"))


def _command(spec):
    """Runs ``fastabsld <spec['argv']>``; returns what its ``train`` call returned."""
    results, train = [], train_module.train

    def keeping(*args, **kwargs):
        results.append(train(*args, **kwargs))
        return results[-1]

    train_module.train = keeping
    if cli.main(spec["argv"]) != 0:
        raise SystemExit("the command failed")
    return results[-1]


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(json.loads(sys.argv[1]))
