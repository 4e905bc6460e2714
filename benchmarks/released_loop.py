"""A faithful re-implementation of the authors' released ABSLD training step (the speed baseline).

It keeps what makes the released script slow, on purpose:

- the teacher's logits are taken once under ``no_grad`` and "copied" twice with ``.detach()``
  (two views of one storage), then divided by the class temperatures in a Python loop over the
  batch, one row at a time (so both branches end up divided by ``tau_adv[y] * tau_nat[y]``: the
  aliasing that ``ABSLDLoss(temperature_mode="released")`` reproduces);
- the inner maximisation is eager PGD in the torchattacks/RSLAD style: ``x + 0.001 * N(0, 1)``,
  then per step a summed ``kl_div(log_softmax(student(x')), softmax(teacher))``, ``sign``, and the
  two clamps as separate ops;
- the outer loss is the unfused per-element ``p * (log(p + 1e-5) - log q)`` averaged over B*C;
- the class error risk is accumulated sample by sample, one cross-entropy per sample.

Not collected by pytest (no ``bench_``/``test_`` prefix): ``benchmarks/bench_train_step.py`` and
``tests/test_train_speed.py`` import it.
"""

import torch
import torch.nn.functional as F

from fastabsld.reference import released_absld_kl_mean


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


def released_step(student, teacher, optimizer, x, y, state, *, eps, alpha, steps=10, generator=None,
                  adv_weight=5 / 6, nat_weight=1 / 6):
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

    Returns:
        Tensor: the (detached) scalar loss of the step.
    """
    student.train()
    optimizer.zero_grad()
    with torch.no_grad():
        teacher_logits = teacher(x)
        teacher_adv = teacher_logits.detach()
        teacher_nat = teacher_logits.detach()
    for i in range(len(y)):
        teacher_adv[i] = teacher_adv[i] / state["tau_adv"][y[i]]
        teacher_nat[i] = teacher_nat[i] / state["tau_nat"][y[i]]
    x_adv = released_inner_attack(student, teacher_adv, x, eps=eps, alpha=alpha, steps=steps, generator=generator)
    adv_logits = student(x_adv)
    nat_logits = student(x)
    loss = (adv_weight * released_absld_kl_mean(adv_logits, F.softmax(teacher_adv.detach(), dim=1))
            + nat_weight * released_absld_kl_mean(nat_logits, F.softmax(teacher_nat.detach(), dim=1)))
    loss.backward()
    optimizer.step()
    for i in range(len(y)):
        state["risk_adv"][y[i]] += F.cross_entropy(adv_logits[i:i + 1].detach(), y[i:i + 1])
        state["risk_nat"][y[i]] += F.cross_entropy(nat_logits[i:i + 1].detach(), y[i:i + 1])
    return loss.detach()
