"""The end-to-end ABSLD training step: fastabsld's recipe against the released loop, in one run.

Group ``train-step``: one step on the digits models (student ``cnn-s``, teacher ``cnn-l``), batch 128,
10 PGD steps: teacher forward, the inner attack, the student's two forwards and backward, SGD and the
class-risk accumulation.

- ``released``: ``tests.released.released_step`` (per-sample Python loops, unfused loss,
  eager PGD, NCHW);
- ``fastabsld``: ``fastabsld.recipe.train.train_epoch`` on one batch with the default TrainConfig
  (BatchNorm-folded attack view);
- ``fastabsld-channels-last``: the same with ``channels_last=True``;
- ``fastabsld-no-fold``: ``fold_bn=False`` (what the folding buys);
- ``fastabsld-compile``: ``compile=True`` (timed only with benchmarks enabled: inductor's compile alone
  takes tens of seconds here).

Target on the 2-core CPU: ``fastabsld-channels-last`` at least 1.3x faster than ``released`` (torch's
default threads; the released loop's per-sample Python loops do not get faster with more threads,
the convolutions do). The cases run one after the other, so on a shared machine compare minima or use
``python -m benchmarks.step_breakdown --threads 2``, which alternates the two steps and splits them
into phases.

Run: ``python -m pytest benchmarks/bench_train_step.py --benchmark-only --benchmark-columns=min,median,rounds``.
With ``--benchmark-disable`` every case runs once at batch 16 with 2 PGD steps.
"""

import pytest
import torch

from benchmarks import summary
from fastabsld.recipe import speed
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.loop import train_epoch
from fastabsld.recipe.models import build_model
from fastabsld.recipe.steps import build_loss
from tests.released import released_step

NUM_CLASSES = 10
VARIANTS = {
    "fastabsld": {},
    "fastabsld-channels-last": {"channels_last": True},
    "fastabsld-no-fold": {"fold_bn": False},
    "fastabsld-compile": {"compile": True},
}


def _setup(batch):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 8, 8, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    torch.manual_seed(1)
    teacher = build_model("cnn-l", NUM_CLASSES, 1).eval().requires_grad_(False)
    student = build_model("cnn-s", NUM_CLASSES, 1)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    return x, y, teacher, student, optimizer


def _released_runner(batch, steps):
    x, y, teacher, student, optimizer = _setup(batch)
    cfg = TrainConfig(progress=False)
    state = {k: torch.ones(NUM_CLASSES) for k in ("tau_adv", "tau_nat")}
    state.update({k: torch.zeros(NUM_CLASSES) for k in ("risk_adv", "risk_nat")})
    gen = torch.Generator().manual_seed(2)

    def run():
        return released_step(student, teacher, optimizer, x, y, state, eps=cfg.eps, alpha=cfg.alpha, steps=steps,
                             generator=gen)

    return run


def _fastabsld_runner(batch, steps, options):
    x, y, teacher, student, optimizer = _setup(batch)
    cfg = TrainConfig(steps=steps, progress=False, **options)
    if cfg.channels_last:
        student, teacher = student.to(memory_format=torch.channels_last), teacher.to(memory_format=torch.channels_last)
    step_student, view, teacher = speed.step_models(student, cfg, teacher=teacher)
    loss_fn = build_loss(cfg, NUM_CLASSES)
    gen = torch.Generator().manual_seed(2)
    batches = [(x, y)]

    def run():
        return train_epoch(step_student, loss_fn, optimizer, batches, cfg, gen, teacher=teacher, attack_model=view)

    return run


@pytest.mark.parametrize("impl", ["released"] + list(VARIANTS))
def test_train_step(benchmark, impl):
    benchmark.group = "train-step"
    batch, steps = (16, 2) if benchmark.disabled else (128, 10)
    if benchmark.disabled and impl == "fastabsld-compile":
        pytest.skip("the torch.compile variant is timed only with benchmarks enabled")
    run = _released_runner(batch, steps) if impl == "released" else _fastabsld_runner(batch, steps, VARIANTS[impl])
    if not benchmark.disabled:
        run()  # warm up (and compile) outside the timing
    # Each fastabsld variant is a row; the released loop is the baseline of all of them.
    summary.record(benchmark, op=f"ABSLD training step (cnn-s from cnn-l, digits, batch {batch}, {steps} PGD steps)",
                   case=None if impl == "released" else impl, impl="released" if impl == "released" else "fastabsld")
    loss = benchmark(run)
    assert torch.isfinite(loss)
