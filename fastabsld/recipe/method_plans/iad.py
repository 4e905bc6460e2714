"""IAD-I (Zhu et al., ICLR 2022, introspective adversarial distillation) as a recipe method, as the official
``IAD-I.py`` trains.

Per batch: ARD's attack (:func:`fastabsld.recipe.method_plans.ard.attack_in_train_mode`: the train-mode
student's cross-entropy, uniform start); the student's logits on the adversarial and the clean batch (train
mode); after the warm-up, the teacher's logits on the adversarial batch, whose true-class probability raised
to ``iad_beta`` is the trust in the teacher; then :class:`fastabsld.methods.IADLoss`: ARD with the per-sample
KL (``batchmean``) until ``int(iad_warmup * epochs)`` epochs, then the teacher term plus the distrust-weighted
self-introspection ``KL(S(x) || S(x_adv))``. The official script calls the student on the clean batch twice
after the warm-up (the CE's logits and the introspection's target, the same values); here one forward serves
both, so BatchNorm's running statistics see the clean batch once per step, not twice.

The epoch reaches the loss at every epoch's start (``IADLoss.set_epoch``, saved in checkpoints). With
``cfg.reweight`` it is Fair-IAD (counting on the train-mode student, the class weights on every term's rows).
"""

from fastabsld.methods.iad import IADLoss
from fastabsld.recipe.method_plans.ard import attacked_forwards
from fastabsld.recipe.method_plans.base import MethodPlan, sample_weight, teacher_logits, untimed


def warmup_epochs(cfg):
    """IAD's warm-up in epochs: ``int(iad_warmup * epochs)`` (60 of 200 in the paper).

    Args:
        cfg: TrainConfig.

    Returns:
        int: the first epoch (0-based) of the introspective loss.
    """
    return int(cfg.iad_warmup * cfg.epochs)


class IADPlan(MethodPlan):
    """``iad`` (see the module doc)."""

    name = "iad"
    distills = True

    def build_loss(self, cfg, num_classes):
        return IADLoss(temperature=cfg.iad_temperature, alpha=cfg.iad_alpha, beta=cfg.iad_beta,
                       warmup_epochs=warmup_epochs(cfg))

    def step(self, student, teacher, loss_fn, x, y, cfg, generator, *, reweight=None, attack_model=None,
             phase=None):
        phase = phase or untimed
        z_t, x_adv, adv_logits, nat_logits = attacked_forwards(student, teacher, x, y, cfg, generator, reweight,
                                                               phase)
        guide = None
        if loss_fn.needs_teacher_adv_logits:
            with phase("teacher"):
                guide = teacher_logits(teacher, x_adv, cfg)
        with phase("loss"):
            return loss_fn(adv_logits, nat_logits, z_t, y, teacher_adv_logits=guide,
                           sample_weight=sample_weight(reweight, y))

    def start_epoch(self, loss_fn, cfg, epoch):
        loss_fn.set_epoch(epoch)

    def end_epoch(self, loss_fn, cfg, epoch):
        return {"introspective": loss_fn.introspective}
