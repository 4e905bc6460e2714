"""ABSLD and RSLAD: distillation to the teacher's (class-tempered) soft labels, as in the authors' released script.

Per batch: the frozen teacher's logits on the clean batch are computed once; the student, in eval mode, is
attacked with ``cfg.steps`` PGD steps from ``x + 0.001 * N(0, 1)`` maximising the summed KL to the
tempered teacher labels ``loss_fn.teacher_probs(z_t, y, "adv")``; then, in train mode,
``loss_fn(student(x_adv), student(x), z_t, y)`` is minimised. ``rslad`` is the same step with the
temperatures fixed at 1 (beta = 0). Once per epoch the temperatures take their anti-bias step; beta
follows the LR milestones (:func:`fastabsld.recipe.schedule.beta_at`).

With ``cfg.reweight`` it is Fair-RSLAD (rslad) or ABSLD with Fair-ARD's sample re-weighting: the
attack's steps are counted on the eval-mode student (as the Fair-RSLAD script does) and the class
weights multiply both KL terms' rows.
"""

from fastabsld.attack import kl_loss, pgd
from fastabsld.methods.absld import ABSLDLoss
from fastabsld.recipe import speed
from fastabsld.recipe.method_plans.base import MethodPlan, sample_weight, teacher_logits, tracked, untimed
from fastabsld.recipe.schedule import beta_at


class ABSLDPlan(MethodPlan):
    """``absld`` or ``rslad`` (see the module doc).

    Args:
        name: ``"absld"`` or ``"rslad"``.
    """

    distills = True
    folded_attack = True

    def __init__(self, name):
        self.name = name

    def build_loss(self, cfg, num_classes):
        return ABSLDLoss(num_classes, adv_weight=cfg.adv_weight, nat_weight=cfg.nat_weight, tau_init=1.0,
                         tau_min=cfg.tau_min, tau_max=cfg.tau_max, beta=beta_at(cfg, 0),
                         temperature_mode=cfg.temperature_mode)

    def step(self, student, teacher, loss_fn, x, y, cfg, generator, *, reweight=None, attack_model=None,
             phase=None):
        phase = phase or untimed
        with phase("teacher"):
            z_t = teacher_logits(teacher, x, cfg)
        with phase("labels"):
            target = loss_fn.teacher_probs(z_t, y, branch="adv")
        with phase("attack"):
            student.eval()
            attacked = student if attack_model is None else attack_model.refresh()
            x_adv = pgd(speed.Fp32Logits(attacked, cfg.amp), x, tracked(kl_loss(target), y, reweight), eps=cfg.eps,
                        alpha=cfg.alpha, steps=cfg.steps, random_start="normal", generator=generator,
                        eval_mode=False)
            student.train()
        with phase("student"):
            adv_logits = speed.forward_fp32(student, x_adv, cfg.amp)
            nat_logits = speed.forward_fp32(student, x, cfg.amp)
        with phase("loss"):
            return loss_fn(adv_logits, nat_logits, z_t, y, sample_weight=sample_weight(reweight, y))

    def start_epoch(self, loss_fn, cfg, epoch):
        loss_fn.beta = beta_at(cfg, epoch)

    def end_epoch(self, loss_fn, cfg, epoch):
        entry = {"beta": loss_fn.beta}
        loss_fn.update_temperatures()
        entry.update(tau_adv=loss_fn.tau_adv.tolist(), tau_nat=loss_fn.tau_nat.tolist())
        return entry

    def checkpoint_entries(self, loss_fn):
        return {"loss_fn": loss_fn.state_dict(), "beta": loss_fn.beta}
