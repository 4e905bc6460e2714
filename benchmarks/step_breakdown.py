"""Where the time of one distillation step goes: fastabsld's recipe against the released loop, phase by phase.

Not collected by pytest (a helper and a script). Run it on an otherwise idle machine:

    python -m benchmarks.step_breakdown [--batch 128] [--steps 10] [--reps 20] [--threads 1] [--channels-last]
        [--no-fold-bn]

Phases (wall-clock per step, the minimum over ``--reps`` steps after two warm-up steps: the least disturbed
by other work on a shared machine):
``teacher`` (teacher forward), ``labels`` (tempered soft labels; the released per-sample
temperature loop), ``attack`` (the 10-step inner PGD), ``student`` (forwards on the adversarial and
natural batches), ``loss``, ``backward``, ``optimiser`` (zero_grad + SGD step) and ``risk`` (the
released per-sample risk loop; fastabsld accumulates the risk inside ``loss``).
"""

import argparse
import contextlib
import time

import torch

from fastabsld.loss import ABSLDLoss
from fastabsld.recipe import speed
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.models import build_model
from fastabsld.recipe.steps import train_step
from tests.released import released_step

EPS, ALPHA = 0.1, 0.025


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase (synchronising CUDA around each phase)."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        began = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.setdefault(name, []).append(time.perf_counter() - began)


def fastabsld_phases(timer, student, teacher, loss_fn, optimizer, x, y, cfg, generator, attack_model=None):
    """One fastabsld recipe step (``fastabsld.recipe.steps.train_step``), timed per phase."""
    train_step(student, loss_fn, optimizer, x, y, cfg, generator, teacher=teacher, attack_model=attack_model,
               phase=timer)


def released_phases(timer, student, teacher, state, optimizer, x, y, steps, generator):
    """One step of ``tests.released.released_step``, timed per phase."""
    released_step(student, teacher, optimizer, x, y, state, eps=EPS, alpha=ALPHA, steps=steps, generator=generator,
                  phase=timer)


def breakdown(*, batch=128, steps=10, reps=20, channels_last=False, fold_bn=True, student_name="cnn-s",
              teacher_name="cnn-l", image=(1, 8, 8), num_classes=10, device="cpu"):
    """Times both steps phase by phase, alternating them, on synthetic data.

    Args:
        batch: batch size.
        steps: PGD steps.
        reps: timed steps per implementation (after two warm-up steps each).
        channels_last: run fastabsld's step in channels_last (the released loop stays NCHW).
        fold_bn: fastabsld's ``fold_bn`` option (folded attack and teacher views).
        student_name, teacher_name: model names of ``fastabsld.recipe.models``.
        image: (channels, height, width) of the synthetic inputs.
        num_classes: classes.
        device: where to run.

    Returns:
        dict: ``{"fastabsld": {phase: minimum seconds}, "released": {...}}``.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch,) + tuple(image), generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    teacher = build_model(teacher_name, num_classes, image[0]).to(device).eval().requires_grad_(False)
    runs = {}
    for name in ("fastabsld", "released"):
        torch.manual_seed(1)
        student = build_model(student_name, num_classes, image[0]).to(device)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        attack_gen = torch.Generator(device=device).manual_seed(2)
        if name == "fastabsld":
            t_model, inputs = teacher, x
            if channels_last:
                student = student.to(memory_format=torch.channels_last)
                t_model = build_model(teacher_name, num_classes, image[0]).to(device).eval().requires_grad_(False)
                t_model.load_state_dict(teacher.state_dict())
                t_model = t_model.to(memory_format=torch.channels_last)
                inputs = x.contiguous(memory_format=torch.channels_last)
            loss_fn = ABSLDLoss(num_classes, temperature_mode="released").to(device)
            cfg = TrainConfig(channels_last=channels_last, fold_bn=fold_bn, progress=False, eps=EPS, alpha=ALPHA,
                              steps=steps)
            step_student, view, t_model = speed.step_models(student, cfg, teacher=t_model)
            loss_fn.train()
            args = (step_student, t_model, loss_fn, optimizer, inputs, y, cfg, attack_gen, view)
            runs[name] = (fastabsld_phases, args, PhaseTimer())
        else:
            state = {k: torch.ones(num_classes, device=device) for k in ("tau_adv", "tau_nat")}
            state.update({k: torch.zeros(num_classes, device=device) for k in ("risk_adv", "risk_nat")})
            runs[name] = (released_phases, (student, teacher, state, optimizer, x, y, steps, attack_gen),
                          PhaseTimer())
    for fn, args, _ in runs.values():
        for _ in range(2):
            fn(PhaseTimer(), *args)
    for _ in range(reps):
        for fn, args, timer in runs.values():
            fn(timer, *args)
    return {name: {phase: min(v) for phase, v in timer.seconds.items()}
            for name, (_, _, timer) in runs.items()}


def format_breakdown(result):
    """A text table of :func:`breakdown`'s result in milliseconds, with totals and the ratio.

    Args:
        result: the dict returned by :func:`breakdown`.

    Returns:
        str: the table.
    """
    phases = list(dict.fromkeys(p for r in result.values() for p in r))
    names = list(result)
    lines = [f"{'phase':<10}" + "".join(f"{n:>12}" for n in names)]
    for phase in phases + ["total"]:
        cells = []
        for n in names:
            value = sum(result[n].values()) if phase == "total" else result[n].get(phase)
            cells.append(f"{value * 1e3:>10.2f}ms" if value is not None else f"{'-':>12}")
        lines.append(f"{phase:<10}" + "".join(cells))
    totals = [sum(result[n].values()) for n in names]
    if len(totals) == 2:
        lines.append(f"speed-up ({names[1]} / {names[0]}): {totals[1] / totals[0]:.2f}x")
    return "\n".join(lines)


def main(argv=None):
    """Command line: prints the breakdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true", help="fastabsld's step in channels_last")
    p.add_argument("--no-fold-bn", action="store_true", help="fastabsld's step without the folded views")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = breakdown(batch=args.batch, steps=args.steps, reps=args.reps, channels_last=args.channels_last,
                       fold_bn=not args.no_fold_bn)
    print(format_breakdown(result))


if __name__ == "__main__":
    main()
