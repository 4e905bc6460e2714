"""TRADES (Zhang et al., ICML 2019) as a recipe method: for a student trained without a teacher, or the teacher.

Per batch, as the official ``trades_loss``: the model, in eval mode, gives its clean logits (no graph),
the attack's target (phase ``labels``); it is attacked with ``cfg.steps`` PGD steps from
``x + 0.001 * N(0, 1)`` maximising ``sum_i KL(softmax(f(x)_i) || softmax(f(x')_i))``
(:func:`fastabsld.methods.trades_attack_loss`); then, in train mode,
``CE(f(x), y) + trades_beta * (1/B) sum_i KL(softmax(f(x)_i) || softmax(f(x_adv)_i))`` is minimised with the
gradient flowing through both logits (:class:`fastabsld.methods.TRADESLoss`). The official script calls the
model on the clean batch twice in train mode (for the CE and the KL's target, the same values); here one
forward serves both, so BatchNorm's running statistics see the clean batch once per step, not twice.
"""

import torch

from fastabsld.attack import pgd
from fastabsld.methods.trades import RANDOM_START, TRADESLoss, trades_attack_loss
from fastabsld.recipe import speed
from fastabsld.recipe.method_plans.base import MethodPlan, untimed


class TRADESPlan(MethodPlan):
    """``trades`` (see the module doc)."""

    name = "trades"
    folded_attack = True

    def build_loss(self, cfg, num_classes):
        return TRADESLoss(beta=cfg.trades_beta)

    def step(self, student, teacher, loss_fn, x, y, cfg, generator, *, reweight=None, attack_model=None,
             phase=None):
        phase = phase or untimed
        student.eval()
        attacked = speed.Fp32Logits(student if attack_model is None else attack_model.refresh(), cfg.amp)
        with phase("labels"), torch.no_grad():
            clean = attacked(x)
        with phase("attack"):
            x_adv = pgd(attacked, x, trades_attack_loss(clean), eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps,
                        random_start=RANDOM_START, generator=generator, eval_mode=False)
            student.train()
        with phase("student"):
            adv_logits = speed.forward_fp32(student, x_adv, cfg.amp)
            nat_logits = speed.forward_fp32(student, x, cfg.amp)
        with phase("loss"):
            return loss_fn(adv_logits, nat_logits, y)
