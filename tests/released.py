"""Direct transcriptions of the authors' released ABSLD formulas, written with plain torch ops.

They are the oracle of the ABSLD tests and deliberately keep the released code's behaviour,
including the NaN on tied risks and the tensor aliasing of the two temperature branches.
"""

import torch

from fastabsld.reference import released_absld_kl_mean


def released_temperature_update(tau, risk, beta, tau_min=0.5, tau_max=5.0):
    """``clamp(tau - beta * (R - mean R) / max|R - mean R|, tau_min, tau_max)``, unguarded."""
    centred = risk - torch.mean(risk)
    normalised = centred / torch.max(torch.abs(centred))
    return torch.clamp(tau - beta * normalised, tau_min, tau_max)


def released_soft_labels(teacher_logits, labels, tau_adv, tau_nat, aliased):
    """The two branches' teacher soft labels.

    ``aliased=True`` mimics the released script: its two "copies" of the teacher logits are
    ``.detach()`` views of one storage, divided in place row by row, so both end up divided by
    ``tau_adv[y] * tau_nat[y]`` before either softmax is taken.
    """
    if aliased:
        shared = teacher_logits.clone()
        adv_view = shared
        adv_view /= tau_adv[labels].unsqueeze(1)
        nat_view = shared
        nat_view /= tau_nat[labels].unsqueeze(1)
        return torch.softmax(adv_view, dim=1), torch.softmax(nat_view, dim=1)
    return (torch.softmax(teacher_logits / tau_adv[labels].unsqueeze(1), dim=1),
            torch.softmax(teacher_logits / tau_nat[labels].unsqueeze(1), dim=1))


def released_absld_loss(adv_logits, nat_logits, teacher_logits, labels, tau_adv, tau_nat, aliased,
                        adv_weight=5 / 6, nat_weight=1 / 6):
    """The released outer objective ``5/6 KLmean(adv) + 1/6 KLmean(nat)``."""
    p_adv, p_nat = released_soft_labels(teacher_logits, labels, tau_adv, tau_nat, aliased)
    return (adv_weight * released_absld_kl_mean(adv_logits, p_adv)
            + nat_weight * released_absld_kl_mean(nat_logits, p_nat))
