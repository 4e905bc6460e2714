"""The authors' released ABSLD training script, transcribed with plain torch ops: the one released baseline.

It is the oracle of the ABSLD tests (the formulas) and the speed baseline of the benchmarks (the
training step), and it deliberately keeps the released code's behaviour:

- the per-element KL ``mean(p * (log(p + 1e-5) - log q))`` with ``log(softmax(s))``, in the inputs'
  dtype;
- the unguarded temperature update (NaN when all class risks tie);
- the teacher's logits taken once under ``no_grad`` and "copied" twice with ``.detach()`` (two views
  of one storage), then divided by the class temperatures in a Python loop over the batch, so both
  branches end up divided by ``tau_adv[y] * tau_nat[y]`` (the aliasing that
  ``ABSLDLoss(temperature_mode="released")`` reproduces);
- the inner maximisation as eager PGD in the torchattacks/RSLAD style: ``x + 0.001 * N(0, 1)``, then
  per step a summed ``kl_div(log_softmax(student(x')), softmax(teacher))``, ``sign``, and the two
  clamps as separate ops;
- the class error risk accumulated sample by sample, one cross-entropy per sample.

The step is written as the same named phases as ``fastabsld.recipe.steps`` (``teacher``, ``labels``,
``attack``, ``student``, ``loss``, ``backward``, ``optimiser``, plus ``risk``), with the same ``phase``
timing hook, so that ``benchmarks/step_breakdown.py`` times it without a copy.
"""

import contextlib

import torch
import torch.nn.functional as F


def _untimed(name):
    return contextlib.nullcontext()


def released_kl_mean(student_logits, teacher_probs):
    """The per-element KL of the released ABSLD code: mean of ``p * (log(p + 1e-5) - log q)`` over B*C."""
    log_q = torch.log(torch.softmax(student_logits, dim=1))
    return (teacher_probs * (torch.log(teacher_probs + 1e-5) - log_q)).mean()


def released_temperature_update(tau, risk, beta, tau_min=0.5, tau_max=5.0):
    """``clamp(tau - beta * (R - mean R) / max|R - mean R|, tau_min, tau_max)``, unguarded."""
    centred = risk - torch.mean(risk)
    normalised = centred / torch.max(torch.abs(centred))
    return torch.clamp(tau - beta * normalised, tau_min, tau_max)


def released_teacher_logits(teacher, x):
    """The teacher's logits once under no_grad, and the script's two "copies" (views of one storage)."""
    with torch.no_grad():
        teacher_logits = teacher(x)
        return teacher_logits.detach(), teacher_logits.detach()


def released_temper(teacher_adv, teacher_nat, labels, tau_adv, tau_nat):
    """Divides the two views by their class temperatures, row by row, in place (as released)."""
    for i in range(len(labels)):
        teacher_adv[i] = teacher_adv[i] / tau_adv[labels[i]]
        teacher_nat[i] = teacher_nat[i] / tau_nat[labels[i]]


def released_soft_labels(teacher_logits, labels, tau_adv, tau_nat, aliased):
    """The two branches' teacher soft labels.

    ``aliased=True`` runs the released script's in-place loop on two views of one copy of the logits,
    so both end up divided by ``tau_adv[y] * tau_nat[y]`` before either softmax is taken;
    ``aliased=False`` is the paper's intent, each branch with its own temperature.
    """
    if aliased:
        shared = teacher_logits.clone()
        adv_view, nat_view = shared.detach(), shared.detach()
        released_temper(adv_view, nat_view, labels, tau_adv, tau_nat)
        return torch.softmax(adv_view, dim=1), torch.softmax(nat_view, dim=1)
    return (torch.softmax(teacher_logits / tau_adv[labels].unsqueeze(1), dim=1),
            torch.softmax(teacher_logits / tau_nat[labels].unsqueeze(1), dim=1))


def released_absld_loss(adv_logits, nat_logits, teacher_logits, labels, tau_adv, tau_nat, aliased,
                        adv_weight=5 / 6, nat_weight=1 / 6):
    """The released outer objective ``5/6 KLmean(adv) + 1/6 KLmean(nat)`` from raw teacher logits."""
    p_adv, p_nat = released_soft_labels(teacher_logits, labels, tau_adv, tau_nat, aliased)
    return adv_weight * released_kl_mean(adv_logits, p_adv) + nat_weight * released_kl_mean(nat_logits, p_nat)


def released_inner_attack(student, teacher_logits, x, *, eps, alpha, steps, generator=None):
    """RSLAD/ABSLD's inner maximisation as released: eager PGD on the summed KL to the teacher's softmax.

    Args:
        student: the student (put in eval mode here; back in train mode on return).
        teacher_logits: (B, C) tempered teacher logits.
        x: (B, ...) clean inputs in [0, 1].
        eps, alpha, steps: the L-inf threat model.
        generator: torch.Generator of the start noise (the released script uses the global one).

    Returns:
        Tensor: the adversarial inputs, detached.
    """
    student.eval()
    target = F.softmax(teacher_logits, dim=1)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = x.detach() + 0.001 * noise.detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.kl_div(F.log_softmax(student(x_adv), dim=1), target, reduction="none").sum()
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    student.train()
    return x_adv.detach()


def released_risk(state, adv_logits, nat_logits, labels):
    """Adds each sample's cross-entropy to its class's risk, one sample at a time (as released)."""
    for i in range(len(labels)):
        state["risk_adv"][labels[i]] += F.cross_entropy(adv_logits[i:i + 1].detach(), labels[i:i + 1])
        state["risk_nat"][labels[i]] += F.cross_entropy(nat_logits[i:i + 1].detach(), labels[i:i + 1])


def released_step(student, teacher, optimizer, x, y, state, *, eps, alpha, steps=10, generator=None,
                  adv_weight=5 / 6, nat_weight=1 / 6, phase=None):
    """One released ABSLD training step (attack, loss, SGD step, per-sample risk accumulation).

    Args:
        student: the student network.
        teacher: the frozen teacher (eval mode).
        optimizer: the student's optimiser.
        x, y: the batch.
        state: dict with the (C,) tensors ``tau_adv``, ``tau_nat``, ``risk_adv``, ``risk_nat``
            (the risks are updated in place).
        eps, alpha, steps: the L-inf threat model of the inner attack.
        generator: torch.Generator of the attack's start noise.
        adv_weight, nat_weight: the weights of the two KL terms.
        phase: context-manager factory called with each phase's name (timing), or None.

    Returns:
        Tensor: the (detached) scalar loss of the step.
    """
    phase = phase or _untimed
    student.train()
    optimizer.zero_grad()
    with phase("teacher"):
        teacher_adv, teacher_nat = released_teacher_logits(teacher, x)
    with phase("labels"):
        released_temper(teacher_adv, teacher_nat, y, state["tau_adv"], state["tau_nat"])
    with phase("attack"):
        x_adv = released_inner_attack(student, teacher_adv, x, eps=eps, alpha=alpha, steps=steps, generator=generator)
    with phase("student"):
        adv_logits = student(x_adv)
        nat_logits = student(x)
    with phase("loss"):
        loss = (adv_weight * released_kl_mean(adv_logits, F.softmax(teacher_adv.detach(), dim=1))
                + nat_weight * released_kl_mean(nat_logits, F.softmax(teacher_nat.detach(), dim=1)))
    with phase("backward"):
        loss.backward()
    with phase("optimiser"):
        optimizer.step()
    with phase("risk"):
        released_risk(state, adv_logits, nat_logits, y)
    return loss.detach()
