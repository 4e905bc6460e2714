"""A training process that SIGKILLs itself at a chosen point, for the fault tests (``tests/recipe/test_faults.py``).

The tests start it through a multiprocessing forkserver that has imported torch and the recipe once,
so that every killed process is a real process of its own without paying the import each time.
``run(spec)`` trains as the spec says; ``spec["kill"] = {"phase": P, "nth": n}`` kills the process
with SIGKILL at the n-th event of phase P:

- ``train``: a training step is about to run;
- ``val`` / ``test``: an attack (clean, PGD-20) of the validation / test evaluation is about to run;
- ``write``: a checkpoint write has put half of its payload into the temporary file (flushed to disk);
- ``rotate``: a checkpoint write is about to rename a finished file into place (the new file or the
  ``.prev`` copy of the old one).

Just before dying it writes ``killed.json`` (phase, n) into ``spec["out"]``; a process that finishes
writes ``result.pt`` (the returned history, test evaluation and weights) there instead.
"""

import io
import json
import os
import re
import signal

import torch
import torch._dynamo  # noqa: F401  (imported here, by the forkserver, not by every process: torch.optim imports
import tqdm.auto  # noqa: F401   it lazily, at about 4 s of CPU; tqdm.auto likewise)

from fastabsld import evaluation
from fastabsld.recipe import checkpoint, loop, report, teacher as teacher_mod
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.models import build_model
from fastabsld.recipe.train import train

PHASES = ("train", "val", "test", "write", "rotate")


def fixed_teacher():
    """The untrained teacher of the fault tests (the same weights in every process)."""
    torch.manual_seed(7)
    return build_model("cnn-s", 10, 1).eval()


def cheap_evaluate(evaluate):
    """``evaluate`` with 1-step PGD/CW: what the fault tests check does not depend on the attacks' strength."""

    def evaluating(model, loader, attacks, *args, **kwargs):
        cheap = [re.sub(r"^(pgd|cw)\d+$", r"\g<1>1", name) for name in attacks]
        results = evaluate(model, loader, cheap, *args, **kwargs)
        asked = dict(zip(attacks, cheap))  # keyed as the run asked
        return evaluation.Evaluation({name: results[short] for name, short in asked.items()}, results.labels,
                                     {name: results.predictions[short] for name, short in asked.items()})

    return evaluating


def _install_kill(kill, out, data):
    counts = dict.fromkeys(PHASES, 0)
    where = {"eval": None}

    def event(phase):
        if kill is None or phase != kill["phase"]:
            return
        counts[phase] += 1
        if counts[phase] == kill["nth"]:
            with open(os.path.join(out, "killed.json"), "w") as f:
                json.dump(kill, f)
            os.kill(os.getpid(), signal.SIGKILL)

    step = loop.train_step

    def train_step(*args, **kwargs):
        event("train")
        return step(*args, **kwargs)

    loop.train_step = train_step
    evaluate = loop.evaluate

    def evaluating(model, loader, *args, **kwargs):
        where["eval"] = "test" if loader.y is data.test[1] else "val"
        try:
            return evaluate(model, loader, *args, **kwargs)
        finally:
            where["eval"] = None

    loop.evaluate = evaluating
    attacked = evaluation._attacked_inputs

    def attacked_inputs(*args, **kwargs):
        event(where["eval"])
        return attacked(*args, **kwargs)

    evaluation._attacked_inputs = attacked_inputs

    def half_then_die(obj, f):
        if kill and kill["phase"] == "write" and counts["write"] + 1 == kill["nth"]:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            payload = buffer.getvalue()
            f.write(payload[:len(payload) // 2])
            f.flush()
            os.fsync(f.fileno())
        event("write")
        return write_payload(obj, f)

    write_payload = checkpoint._write_payload
    checkpoint._write_payload = half_then_die
    replace = checkpoint._replace

    def replacing(tmp, path):
        event("rotate")
        return replace(tmp, path)

    checkpoint._replace = replacing


def run(spec):
    """Trains as ``spec`` says (see the module doc), dying where ``spec["kill"]`` says.

    Args:
        spec: ``{"data": path of saved Splits, "out": folder, "kill": {...} or None, "cheap_evaluation":
            1-step attacks in the evaluations}`` and either
            ``"config"`` (TrainConfig fields), ``"run_dir"`` and ``"resume"`` for a student run with the
            fixed teacher, or ``"teacher_of"`` (TrainConfig fields) to get (train) that config's teacher.
    """
    torch.set_num_threads(1)
    data = torch.load(spec["data"], weights_only=False)
    if spec.get("cheap_evaluation"):
        loop.evaluate = cheap_evaluate(loop.evaluate)
    _install_kill(spec.get("kill"), spec["out"], data)
    report.plot_run = lambda *args, **kwargs: []  # plots are not under test here and cost a matplotlib import
    quiet = lambda *args: None  # noqa: E731
    if "teacher_of" in spec:
        model = teacher_mod.get_teacher(TrainConfig(**spec["teacher_of"]), data=data, log=quiet)
        torch.save({"model": model.state_dict()}, os.path.join(spec["out"], "result.pt"))
        return
    result = train(TrainConfig(**spec["config"]), spec["run_dir"], resume=spec.get("resume", False),
                   teacher=fixed_teacher(), data=data, log=quiet)
    torch.save({"history": result["history"], "test": result["test"], "model": result["model"].state_dict()},
               os.path.join(spec["out"], "result.pt"))


def hold_lock(run_dir, ready, release=None, produce=None):
    """Holds ``run_dir``'s lock; writes the file ``ready`` once it holds it.

    Args:
        run_dir: the run folder.
        ready: path of the file that says the lock is held.
        release: a path: once it exists, copy ``produce`` and return (releasing the lock); None: hold until
            killed.
        produce: (source, destination) file paths to copy before releasing (what the lock's holder makes).
    """
    import shutil
    import time

    from fastabsld.recipe import lock

    with lock.hold(run_dir):
        with open(ready, "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (release and os.path.exists(release)):
            time.sleep(0.05)
        if produce:
            shutil.copy(*produce)
