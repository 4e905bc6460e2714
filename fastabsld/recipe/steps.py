"""The training steps of the recipe: one batch of ABSLD/RSLAD distillation or of PGD adversarial training.

Per batch of a distillation method (``absld`` or ``rslad``), as in the authors' released script:
the frozen teacher's logits on the clean batch are computed once; the student, switched to eval
mode here (the attack keeps that mode, ``eval_mode=False``), is attacked with ``cfg.steps`` PGD
steps from ``x + 0.001 * N(0, 1)`` maximising the summed KL to the
tempered teacher labels ``loss_fn.teacher_probs(z_t, y, "adv")``; then, in train mode,
``loss_fn(student(x_adv), student(x), z_t, y)`` is minimised. ``rslad`` is the same step with the
temperatures fixed at 1; ``pgd-at`` is PGD adversarial training with cross-entropy (uniform random
start), also used to train the robust teacher.

The steps are written as named phases (``teacher``, ``labels``, ``attack``, ``student``, ``loss``,
``backward``, ``optimiser``); a ``phase`` hook, a context-manager factory called with each name,
lets ``benchmarks/step_breakdown.py`` time them without a copy of the step.
"""

import contextlib

import torch
import torch.nn.functional as F

from fastabsld.methods.absld import ABSLDLoss
from fastabsld.attack import ce_loss, kl_loss, pgd
from fastabsld.recipe import speed
from fastabsld.recipe.schedule import beta_at


def _untimed(name):
    return contextlib.nullcontext()


def build_loss(cfg, num_classes):
    """The distillation loss module of a method (``None`` for ``pgd-at``).

    ``rslad`` is ABSLDLoss with beta = 0 (see :func:`fastabsld.recipe.schedule.beta_at`), so its
    temperatures stay at 1.

    Args:
        cfg: TrainConfig.
        num_classes: number of classes.

    Returns:
        ABSLDLoss or None.
    """
    if cfg.method == "pgd-at":
        return None
    return ABSLDLoss(num_classes, adv_weight=cfg.adv_weight, nat_weight=cfg.nat_weight, tau_init=1.0,
                     tau_min=cfg.tau_min, tau_max=cfg.tau_max, beta=beta_at(cfg, 0),
                     temperature_mode=cfg.temperature_mode)


def distill_step(student, teacher, loss_fn, x, y, cfg, generator, *, attack_model=None, phase=None):
    """Loss of one ABSLD/RSLAD batch (not yet back-propagated). Leaves the student in train mode.

    The teacher's logits are computed once and serve the attack's soft labels and both loss terms.

    Args:
        student: the student network (or its ``torch.compile`` wrapper).
        teacher: the frozen teacher (eval mode).
        loss_fn: ABSLDLoss (in training mode, so it accumulates class risks).
        x, y: the batch.
        cfg: TrainConfig (eps, alpha, steps, amp).
        generator: torch.Generator of the attack's random start.
        attack_model: a :class:`fastabsld.recipe.fold.FoldedEvalView` of the student (refreshed here) for
            the attack, or None to attack the student itself.
        phase: context-manager factory called with each phase's name (timing), or None.

    Returns:
        Tensor: the scalar loss (fp32).
    """
    phase = phase or _untimed
    with phase("teacher"), torch.no_grad():
        teacher_logits = speed.forward_fp32(teacher, x, cfg.amp)
    with phase("labels"):
        target = loss_fn.teacher_probs(teacher_logits, y, branch="adv")
    with phase("attack"):
        student.eval()
        attacked = student if attack_model is None else attack_model.refresh()
        x_adv = pgd(speed.Fp32Logits(attacked, cfg.amp), x, kl_loss(target), eps=cfg.eps, alpha=cfg.alpha,
                    steps=cfg.steps, random_start="normal", generator=generator, eval_mode=False)
        student.train()
    with phase("student"):
        adv_logits = speed.forward_fp32(student, x_adv, cfg.amp)
        nat_logits = speed.forward_fp32(student, x, cfg.amp)
    with phase("loss"):
        return loss_fn(adv_logits, nat_logits, teacher_logits, y)


def pgd_at_step(student, x, y, cfg, generator, *, phase=None):
    """Loss of one PGD adversarial-training batch (cross-entropy on PGD examples, uniform start).

    Args:
        student: the network.
        x, y: the batch.
        cfg: TrainConfig.
        generator: torch.Generator of the random start.
        phase: context-manager factory called with each phase's name (timing), or None.

    Returns:
        Tensor: the scalar loss.
    """
    phase = phase or _untimed
    with phase("attack"):
        student.eval()
        x_adv = pgd(speed.Fp32Logits(student, cfg.amp), x, ce_loss(y), eps=cfg.eps, alpha=cfg.alpha,
                    steps=cfg.steps, random_start="uniform", generator=generator, eval_mode=False)
        student.train()
    with phase("student"):
        logits = speed.forward_fp32(student, x_adv, cfg.amp)
    with phase("loss"):
        return F.cross_entropy(logits, y)


def train_step(student, loss_fn, optimizer, x, y, cfg, generator, *, teacher=None, attack_model=None, phase=None):
    """One optimisation step: the method's loss (:func:`distill_step` or :func:`pgd_at_step`), backward, SGD.

    Args:
        student: what the training passes call (the student, or its DDP / compiled wrapper).
        loss_fn: ABSLDLoss for distillation, None for PGD-AT.
        optimizer: the student's optimiser.
        x, y: the batch, on the device.
        cfg: TrainConfig.
        generator: torch.Generator of the attack's random start.
        teacher: the frozen teacher (needed with ``loss_fn``).
        attack_model: the student's folded eval view for the attack (see :func:`distill_step`).
        phase: context-manager factory called with each phase's name (timing), or None.

    Returns:
        Tensor: the detached scalar loss (on the device; no host sync).
    """
    phase = phase or _untimed
    if loss_fn is None:
        loss = pgd_at_step(student, x, y, cfg, generator, phase=phase)
    else:
        loss = distill_step(student, teacher, loss_fn, x, y, cfg, generator, attack_model=attack_model, phase=phase)
    with phase("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with phase("optimiser"):
        optimizer.step()
    return loss.detach()
