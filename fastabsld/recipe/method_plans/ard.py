"""ARD (Goldblum et al., AAAI 2020) as a recipe method, as the official ``main.py`` trains.

Per batch: the frozen teacher's logits on the clean batch; the student, in *train* mode as in the official
script (BatchNorm uses the batch's statistics and updates its running ones at every attack step), is attacked
with ``cfg.steps`` PGD steps on its own summed cross-entropy from a uniform start in the eps-ball
(:func:`fastabsld.methods.ard_attack_loss`); then ``ard_alpha * t^2 * KL(T^t(x) || S^t(x_adv))`` (mean over
B * C, the official reduction) ``+ (1 - ard_alpha) * CE(S(x), y)`` is minimised (:class:`fastabsld.methods.ARDLoss`,
t = ``ard_temperature``). The clean forward S(x) runs at every step, as the script's does (its BatchNorm
statistics update is part of the recipe), also when ``ard_alpha = 1`` leaves it out of the loss.

With ``cfg.reweight`` it is Fair-ARD: the attack's steps are counted on the train-mode student, as the
Fair-ARD script does, and the class weights multiply the KL and CE rows.
"""

from fastabsld.attack import pgd
from fastabsld.methods.ard import RANDOM_START, ARDLoss, ard_attack_loss
from fastabsld.recipe import speed
from fastabsld.recipe.method_plans.base import MethodPlan, sample_weight, teacher_logits, tracked, untimed


def attack_in_train_mode(student, x, y, cfg, generator, reweight):
    """ARD's inner maximisation (also IAD's): PGD on the train-mode student's cross-entropy, uniform start.

    Args:
        student: what the training passes call (left in train mode).
        x, y: the batch.
        cfg: TrainConfig (eps, alpha, steps, amp).
        generator: torch.Generator of the random start.
        reweight: FairReweight counting the robust steps, or None.

    Returns:
        Tensor: the adversarial batch.
    """
    student.train()
    return pgd(speed.Fp32Logits(student, cfg.amp), x, tracked(ard_attack_loss(y), y, reweight), eps=cfg.eps,
               alpha=cfg.alpha, steps=cfg.steps, random_start=RANDOM_START, generator=generator, eval_mode=False)


def attacked_forwards(student, teacher, x, y, cfg, generator, reweight, phase):
    """The part ARD's and IAD's steps share: the teacher on x, ARD's attack, the student on x_adv and on x.

    Args:
        student: the network being trained (train mode).
        teacher: the frozen teacher.
        x, y: the batch.
        cfg: TrainConfig (threat model, amp).
        generator: torch.Generator of the attack's random start.
        reweight: FairReweight counting the robust steps, or None.
        phase: the step's phase hook (see ``fastabsld.recipe.steps``).

    Returns:
        tuple: (teacher logits on x, x_adv, student logits on x_adv, student logits on x).
    """
    with phase("teacher"):
        z_t = teacher_logits(teacher, x, cfg)
    with phase("attack"):
        x_adv = attack_in_train_mode(student, x, y, cfg, generator, reweight)
    with phase("student"):
        adv_logits = speed.forward_fp32(student, x_adv, cfg.amp)
        nat_logits = speed.forward_fp32(student, x, cfg.amp)
    return z_t, x_adv, adv_logits, nat_logits


class ARDPlan(MethodPlan):
    """``ard`` (see the module doc)."""

    name = "ard"
    distills = True

    def build_loss(self, cfg, num_classes):
        return ARDLoss(temperature=cfg.ard_temperature, alpha=cfg.ard_alpha)

    def step(self, student, teacher, loss_fn, x, y, cfg, generator, *, reweight=None, attack_model=None,
             phase=None):
        phase = phase or untimed
        z_t, _, adv_logits, nat_logits = attacked_forwards(student, teacher, x, y, cfg, generator, reweight, phase)
        with phase("loss"):
            return loss_fn(adv_logits, nat_logits, z_t, y, sample_weight=sample_weight(reweight, y))
