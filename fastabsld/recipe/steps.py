"""The training step of the recipe: one batch of the run's method, then backward and SGD.

What a batch computes is the method's plan (``fastabsld.recipe.method_plans``: ``absld``, ``rslad``,
``pgd-at``, ``trades``, ``ard``, ``iad``, each optionally with Fair-ARD's re-weighting); this module runs
it and the optimisation around it. The steps are written as named phases (``teacher``, ``labels``,
``attack``, ``student``, ``loss``, ``backward``, ``optimiser``); a ``phase`` hook, a context-manager
factory called with each name, lets ``benchmarks/step_breakdown.py`` time them without a copy of the step.
"""

from fastabsld.recipe.method_plans import plan_for
from fastabsld.recipe.method_plans.base import untimed


def build_loss(cfg, num_classes):
    """The loss module of ``cfg.method`` (``None`` for ``pgd-at``), as its plan builds it.

    ``rslad`` is ABSLDLoss with beta = 0 (see :func:`fastabsld.recipe.schedule.beta_at`), so its
    temperatures stay at 1.

    Args:
        cfg: TrainConfig.
        num_classes: number of classes.

    Returns:
        nn.Module or None: ABSLDLoss, TRADESLoss, ARDLoss, IADLoss or None.
    """
    return plan_for(cfg.method).build_loss(cfg, num_classes)


def distill_step(student, teacher, loss_fn, x, y, cfg, generator, *, attack_model=None, phase=None):
    """Loss of one ABSLD/RSLAD batch (not yet back-propagated). Leaves the student in train mode.

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
    return plan_for("absld").step(student, teacher, loss_fn, x, y, cfg, generator, attack_model=attack_model,
                                  phase=phase)


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
    return plan_for("pgd-at").step(student, None, None, x, y, cfg, generator, phase=phase)


def train_step(student, loss_fn, optimizer, x, y, cfg, generator, *, teacher=None, reweight=None, attack_model=None,
               phase=None):
    """One optimisation step: the loss of ``cfg.method``'s plan on the batch, backward, SGD.

    Args:
        student: what the training passes call (the student, or its DDP / compiled wrapper).
        loss_fn: the method's loss module (:func:`build_loss`; None for PGD-AT).
        optimizer: the student's optimiser.
        x, y: the batch, on the device.
        cfg: TrainConfig.
        generator: torch.Generator of the attack's random start.
        teacher: the frozen teacher (needed by the distillation methods).
        reweight: the run's FairReweight (``cfg.reweight``), or None.
        attack_model: the student's folded eval view for an eval-mode attack, or None.
        phase: context-manager factory called with each phase's name (timing), or None.

    Returns:
        Tensor: the detached scalar loss (on the device; no host sync).
    """
    phase = phase or untimed
    loss = plan_for(cfg.method).step(student, teacher, loss_fn, x, y, cfg, generator, reweight=reweight,
                                     attack_model=attack_model, phase=phase)
    with phase("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with phase("optimiser"):
        optimizer.step()
    return loss.detach()
