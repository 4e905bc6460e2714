"""The published training losses and inner attacks of TRADES, ARD, IAD-I and the Fair-ARD family, transcribed
with plain torch ops in the form their official scripts compute them: the oracle of tests/methods.

Deliberately kept from the scripts: the legacy ``nn.KLDivLoss`` reductions (ARD's default "mean" over
B * C elements, TRADES' ``size_average=False`` sum, IAD's per-element ``reduce=False`` summed per row),
``log_softmax``/``softmax`` pairs instead of a fused KL, the per-sample Python loops of the Fair
scripts (one loss and one weight per sample, the robust-step counter ``Kappa`` as a list), the
``.item()`` per sample of IAD's trust, Fair-RSLAD's ``log(p + 1e-5)``, and the attack loops with their
two clamps as separate ops. The random starts are arguments (the scripts draw them from the global
generator), so a test can hand the same start to the library.

Sources: yaodongyu/TRADES ``trades.py``; goldblum/AdversariallyRobustDistillation ``main.py``;
ZFancy/IAD ``IAD-I.py`` and ``IAD-II.py``; NISP-official/Fair-ARD ``Fair-ARD.py``, ``Fair-IAD.py``,
``Fair-RSLAD.py``.
"""

import torch
import torch.nn.functional as F


def _kl_sum(log_probs, probs):
    """``nn.KLDivLoss(size_average=False)``: sum over every element of ``probs * (log probs - log_probs)``."""
    return F.kl_div(log_probs, probs, reduction="sum")


def _kl_mean(log_probs, probs):
    """``nn.KLDivLoss()`` with its default (legacy) reduction: the mean over every element, B * C of a batch."""
    return F.kl_div(log_probs, probs, reduction="none").mean()


def _kl_elements(log_probs, probs):
    """``nn.KLDivLoss(reduce=False)``: the element-wise terms."""
    return F.kl_div(log_probs, probs, reduction="none")


# ---- TRADES -------------------------------------------------------------------------------------


def trades_attack(model, x_natural, noise, *, step_size, epsilon, perturb_steps):
    """``trades_loss``'s inner loop: 0.001 N(0, 1) start (given as ``noise``), summed KL from f(x)."""
    x_adv = x_natural.detach() + 0.001 * noise.detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = _kl_sum(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


def trades_attack_objective(adv_logits, nat_logits):
    """The KL the TRADES attack ascends, from logits."""
    return _kl_sum(F.log_softmax(adv_logits, dim=1), F.softmax(nat_logits, dim=1))


def trades_outer(model, x_natural, x_adv, y, beta):
    """``trades_loss``'s outer loss: two calls of model(x_natural), both differentiated."""
    batch_size = len(x_natural)
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * _kl_sum(F.log_softmax(model(x_adv), dim=1),
                                               F.softmax(model(x_natural), dim=1))
    return loss_natural + beta * loss_robust


def trades_outer_from_logits(adv_logits, nat_logits, y, beta):
    """The same outer loss from precomputed logits."""
    loss_natural = F.cross_entropy(nat_logits, y)
    loss_robust = (1.0 / len(y)) * _kl_sum(F.log_softmax(adv_logits, dim=1), F.softmax(nat_logits, dim=1))
    return loss_natural + beta * loss_robust


# ---- ARD, and the CE attack of ARD / IAD / Fair-ARD / Fair-IAD ----------------------------------


def ce_attack(model, inputs, targets, x_start, *, step_size, epsilon, num_steps, count_robust=False):
    """``AttackPGD.forward`` of the ARD-family scripts from a given start (``inputs + U(-eps, eps)``, unclamped).

    With ``count_robust`` it is the Fair-ARD/Fair-IAD version that also returns ``Kappa``: per sample,
    the number of steps at whose point (before the step) the prediction equals the target.
    """
    kappa = [0 for _ in range(len(inputs))]
    x = x_start.detach()
    for _ in range(num_steps):
        x.requires_grad_()
        out = model(x)
        if count_robust:
            predict = out.max(1, keepdim=True)[1]
            for p in range(len(x)):
                if predict[p] == targets[p]:
                    kappa[p] += 1
        with torch.enable_grad():
            loss = F.cross_entropy(out, targets, reduction="sum")
        grad = torch.autograd.grad(loss, [x])[0]
        x = x.detach() + step_size * torch.sign(grad.detach())
        x = torch.min(torch.max(x, inputs - epsilon), inputs + epsilon)
        x = torch.clamp(x, 0.0, 1.0)
    return (x, kappa) if count_robust else x


def ard_loss(outputs, teacher_outputs, basic_outputs, targets, *, temp, alpha):
    """Goldblum's ARD ``main.py``: ``nn.KLDivLoss()`` (mean over B * C) and a mean CE on the clean logits."""
    kl = _kl_mean(F.log_softmax(outputs / temp, dim=1), F.softmax(teacher_outputs / temp, dim=1))
    return alpha * temp * temp * kl + (1.0 - alpha) * F.cross_entropy(basic_outputs, targets)


def ard_batchmean_loss(outputs, teacher_outputs, basic_outputs, targets, *, temp, alpha):
    """ZFancy/IAD's ``ARD.py`` (and IAD-I's warm-up): the KL summed per row, divided by B."""
    kl = _kl_elements(F.log_softmax(outputs / temp, dim=1), F.softmax(teacher_outputs / temp, dim=1)).sum(dim=1)
    return alpha * temp * temp * (1 / len(outputs)) * torch.sum(kl) + (1.0 - alpha) * F.cross_entropy(basic_outputs,
                                                                                                    targets)


def fair_ard_loss(outputs, teacher_outputs, basic_outputs, targets, reweight, *, temp, alpha):
    """``Fair-ARD.py``'s per-sample loop: each sample's KL (mean over C) and CE times ``reweight[y]``, over B."""
    kl_class, ce_class = [], []
    for i in range(len(outputs)):
        kl_class.append(_kl_mean(F.log_softmax(outputs[i] / temp, dim=0), F.softmax(teacher_outputs[i] / temp, dim=0)))
        ce_class.append(F.cross_entropy(basic_outputs[i].unsqueeze(0), targets[i].unsqueeze(0)))
        kl_class[i] = kl_class[i] * reweight[targets[i]]
        ce_class[i] = ce_class[i] * reweight[targets[i]]
    kl = (1 / len(outputs)) * torch.sum(torch.stack(kl_class))
    ce = (1 / len(outputs)) * torch.sum(torch.stack(ce_class))
    return alpha * temp * temp * kl + (1.0 - alpha) * ce


# ---- IAD-I, IAD-II's teacher weighting, Fair-IAD -----------------------------------------------


def iad_trust(guide, targets, beta):
    """The scripts' ``Alpha``: one ``softmax(guide)[p][y_p] ** beta`` per sample, read with ``.item()``."""
    alpha = torch.ones(len(targets), dtype=guide.dtype)
    for pp in range(len(targets)):
        value = F.softmax(guide, dim=1)[pp][targets[pp].item()]
        alpha[pp] = value.pow(beta).item()
    return alpha


def iad_loss(outputs, teacher_outputs, basic_outputs, fresh_nat_outputs, guide, targets, *, epoch, begin, temp,
             alpha, beta):
    """``IAD-I.py``'s ``train`` loss. ``fresh_nat_outputs`` is its second ``basic_net(inputs)`` (with grad)."""
    n = len(outputs)
    teacher_kl = _kl_elements(F.log_softmax(outputs / temp, dim=1), F.softmax(teacher_outputs / temp, dim=1)).sum(dim=1)
    if epoch >= begin:
        trust = iad_trust(guide, targets, beta)
        self_kl = _kl_elements(F.log_softmax(outputs, dim=1), F.softmax(fresh_nat_outputs, dim=1)).sum(dim=1)
        return (alpha * temp * temp * (1 / n) * torch.sum(teacher_kl)
                + alpha * (1 / n) * torch.sum(self_kl.mul(1 - trust))
                + (1.0 - alpha) * F.cross_entropy(basic_outputs, targets))
    return (alpha * temp * temp * (1 / n) * torch.sum(teacher_kl)
            + (1.0 - alpha) * F.cross_entropy(basic_outputs, targets))


def iad_teacher_weighted_loss(outputs, teacher_outputs, basic_outputs, guide, targets, *, temp, alpha, beta):
    """IAD-I's introspective loss with the teacher term multiplied by ``Alpha`` as ``IAD-II.py`` does."""
    n = len(outputs)
    trust = iad_trust(guide, targets, beta)
    teacher_kl = _kl_elements(F.log_softmax(outputs / temp, dim=1), F.softmax(teacher_outputs / temp, dim=1)).sum(dim=1)
    self_kl = _kl_elements(F.log_softmax(outputs, dim=1), F.softmax(basic_outputs, dim=1)).sum(dim=1)
    return (alpha * temp * temp * (1 / n) * torch.sum(teacher_kl.mul(trust))
            + alpha * (1 / n) * torch.sum(self_kl.mul(1 - trust))
            + (1.0 - alpha) * F.cross_entropy(basic_outputs, targets))


def fair_iad_loss(outputs, teacher_outputs, basic_net_outputs, guide, targets, reweight, *, epoch, begin, temp, alpha,
                  beta):
    """``Fair-IAD.py``'s per-sample loop (its CE term is on the adversarial ``outputs``)."""
    n = len(outputs)
    if epoch >= begin:
        trust = iad_trust(guide, targets, beta)
        kl1, kl2, ce = [], [], []
        for i in range(n):
            kl1.append(_kl_elements(F.log_softmax(outputs[i] / temp, dim=0),
                                    F.softmax(teacher_outputs[i] / temp, dim=0)).sum())
            kl2.append(_kl_elements(F.log_softmax(outputs[i], dim=0), F.softmax(basic_net_outputs[i], dim=0)).sum()
                       .mul(1 - trust[i]))
            ce.append(F.cross_entropy(outputs[i].unsqueeze(0), targets[i].unsqueeze(0)))
            kl1[i] = kl1[i] * reweight[targets[i]]
            kl2[i] = kl2[i] * reweight[targets[i]]
            ce[i] = ce[i] * reweight[targets[i]]
        return (alpha * temp * temp * (1 / n) * torch.sum(torch.stack(kl1))
                + alpha * (1 / n) * torch.sum(torch.stack(kl2))
                + (1.0 - alpha) * (1 / n) * torch.sum(torch.stack(ce)))
    kl1 = []
    for i in range(n):
        kl1.append(_kl_elements(F.log_softmax(outputs[i] / temp, dim=0),
                                F.softmax(teacher_outputs[i] / temp, dim=0)).sum())
        kl1[i] = kl1[i] * reweight[targets[i]]
    return alpha * temp * temp * (1 / n) * torch.sum(torch.stack(kl1))


# ---- Fair-RSLAD ---------------------------------------------------------------------------------


def rslad_kl_attack(model, teacher_logits, x_natural, y, noise, *, step_size, epsilon, perturb_steps):
    """``Fair-RSLAD.py``'s ``rslad_inner_loss`` attack (model in eval mode, set by the caller), with ``Kappa``."""
    x_adv = x_natural.detach() + 0.001 * noise.detach()
    kappa = [0 for _ in range(len(x_adv))]
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        out = model(x_adv)
        predict = out.max(1, keepdim=True)[1]
        for p in range(len(x_adv)):
            if predict[p] == y[p]:
                kappa[p] += 1
        with torch.enable_grad():
            loss_kl = torch.sum(_kl_elements(F.log_softmax(out, dim=1), F.softmax(teacher_logits, dim=1)))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv, kappa


def _rslad_kl(a, b):
    return -a * b + torch.log(b + 1e-5) * b


def fair_rslad_loss(adv_logits, nat_logits, teacher_probs_adv, teacher_probs_nat, labels, reweight):
    """``Fair-RSLAD.py``'s per-sample loop: ``kl_loss(log_softmax, softmax)`` rows times ``reweight[y]``,
    summed over the batch, divided by B, then averaged over the C entries; 5/6 adversarial + 1/6 natural.

    The teacher's soft labels are arguments (``softmax(teacher_logits)`` in the script; ABSLD's tempered
    ones for the combination with ABSLD).
    """
    kl1, kl2 = [], []
    for i in range(len(labels)):
        kl1.append(_rslad_kl(F.log_softmax(adv_logits[i], dim=0), teacher_probs_adv[i]))
        kl2.append(_rslad_kl(F.log_softmax(nat_logits[i], dim=0), teacher_probs_nat[i]))
        kl1[i] = kl1[i] * reweight[labels[i]]
        kl2[i] = kl2[i] * reweight[labels[i]]
    loss1 = torch.mean((1.0 / len(labels)) * sum(kl1))
    loss2 = torch.mean((1.0 / len(labels)) * sum(kl2))
    return 5 / 6.0 * loss1 + 1 / 6.0 * loss2


# ---- Fair-ARD's class weights -------------------------------------------------------------------


def accumulate_kappa(kappa_total, kappa, targets):
    """The scripts' ``Kappa_total[targets[i]] += Kappa[i]``, sample by sample."""
    for i in range(len(kappa)):
        kappa_total[targets[i]] += kappa[i]
    return kappa_total


def weight_assign(kappa_total, samples_per_class, num_classes, beta, eps=1e-5):
    """``Kappa_total / (len(dataset) / C)`` then ``weight_assign``: ``(1/(kappa + eps))**beta``, scaled to
    sum C, clamped to [5/6, 5/2] (``samples_per_class`` stands for ``len(dataset) / C``)."""
    kappa = torch.tensor(kappa_total, dtype=torch.float64) / samples_per_class
    reweight = (1 / (kappa + eps)) ** beta
    scale_factor = num_classes / torch.sum(reweight)
    reweight = reweight * scale_factor
    return torch.clamp(reweight, min=5 / 6, max=5 / 2)
