"""PGD adversarial training (Madry et al.): cross-entropy on PGD examples, the default recipe of a robust teacher.

Per batch: the model, in eval mode, is attacked with ``cfg.steps`` PGD steps on its cross-entropy from a
uniform start in the eps-ball; then, in train mode, the mean cross-entropy on the adversarial batch is
minimised. No teacher, no state across batches.
"""

import torch.nn.functional as F

from fastabsld.attack import ce_loss, pgd
from fastabsld.recipe import speed
from fastabsld.recipe.method_plans.base import MethodPlan, untimed


class PGDATPlan(MethodPlan):
    """``pgd-at`` (see the module doc)."""

    name = "pgd-at"

    def build_loss(self, cfg, num_classes):
        return None

    def step(self, student, teacher, loss_fn, x, y, cfg, generator, *, reweight=None, attack_model=None,
             phase=None):
        phase = phase or untimed
        with phase("attack"):
            student.eval()
            x_adv = pgd(speed.Fp32Logits(student, cfg.amp), x, ce_loss(y), eps=cfg.eps, alpha=cfg.alpha,
                        steps=cfg.steps, random_start="uniform", generator=generator, eval_mode=False)
            student.train()
        with phase("student"):
            logits = speed.forward_fp32(student, x_adv, cfg.amp)
        with phase("loss"):
            return F.cross_entropy(logits, y)
