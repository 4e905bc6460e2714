"""ARD, Adversarially Robust Distillation (Goldblum et al., AAAI 2020).

Paper (S the student, T the teacher, t the distillation temperature, S^t / T^t their tempered
softmax outputs, l the cross-entropy)::

    min_theta E[ alpha * t^2 * KL(S^t(X + delta), T^t(X)) + (1 - alpha) * l(S(X), y) ],
    delta = argmax_{||delta|| <= eps} l(S(X + delta), y)

The paper writes KL(S, T) in the argument order of ``nn.KLDivLoss``; it is the divergence of the
student's from the teacher's distribution, KL(T^t(X) || S^t(X + delta)) = sum_c T_c log(T_c / S_c).

The official code (``goldblum/AdversariallyRobustDistillation``, ``main.py``), which this module follows:

- Inner maximisation: PGD on the *student's* cross-entropy against the hard labels (summed over the
  batch, ``size_average=False``), not on a KL to the teacher; start ``x + U(-eps, eps)`` (not clamped
  to the box before the first step), then ``x' <- clip_[0,1](clip_[x-eps, x+eps](x' + alpha sign g))``;
  CIFAR-10: eps = 8/255, alpha = 2/255, 10 steps. The attack runs inside the training loop with the
  student in *train* mode (batch statistics; the running statistics are updated at every step).
- Outer loss::

      loss = alpha * t^2 * KLDivLoss()(log_softmax(S(x') / t), softmax(T(x) / t))
             + (1 - alpha) * CE_mean(S(x), y)

  ``nn.KLDivLoss()`` has the default (legacy ``size_average``) "mean" reduction: the element-wise
  terms are averaged over all B * C entries, so the KL term is ``alpha t^2 sum_i KL_i / (B C)``,
  not the per-sample mean. The teacher sees the clean batch in eval mode; the CE term uses the
  untempered student logits on the clean batch. Defaults: t = 30, alpha = 1 (the CE term vanishes).
- ZFancy/IAD's ``ARD.py`` baseline divides the summed KL by B instead (``reduction="batchmean"``).

Choices here: ``reduction`` defaults to the official "mean" ("batchmean" gives the per-sample KL);
the KL is the exact fused ``kd_kl_div`` at temperature t for both teacher and student. The attack's
start kind is :data:`RANDOM_START` (``fastabsld.attack.pgd`` clamps the uniform start to the box,
which the official code does only after the first step); whether the attack runs the student in
train or eval mode is the caller's choice (the official code: train mode).

With ``sample_weight`` (Fair-ARD, :class:`fastabsld.methods.fair.FairReweight`) each sample's KL and
CE rows are multiplied by its weight before the division by B * C (KL) and B (CE), as the Fair-ARD
script does per sample.
"""

from torch import nn

from fastabsld.attack import ce_loss
from fastabsld.methods._inputs import check_batch
from fastabsld.methods._weighting import weighted_ce
from fastabsld.ops.checks import check_choice, check_real
from fastabsld.ops.kd_loss import kd_kl_div

RANDOM_START = "uniform"
REDUCTIONS = ("mean", "batchmean")


def ard_attack_loss(labels):
    """ARD's inner objective: the student's cross-entropy against the hard labels, summed over the batch.

    Args:
        labels: (B,) integer labels.

    Returns:
        callable: ``loss_fn(logits) -> scalar`` to maximise (``fastabsld.attack.ce_loss(labels, "sum")``).
    """
    return ce_loss(labels, reduction="sum")


class ARDLoss(nn.Module):
    """The ARD outer loss ``alpha t^2 KL(T^t(x) || S^t(x_adv)) + (1 - alpha) CE(S(x), y)``.

    Args:
        temperature: the distillation temperature t (30 in the paper's CIFAR-10 runs).
        alpha: weight of the distillation term (1 in the official defaults: no CE term).
        reduction: "mean" (the official ``nn.KLDivLoss()``: over B * C elements) or "batchmean" (over B).
    """

    def __init__(self, *, temperature=30.0, alpha=1.0, reduction="mean"):
        super().__init__()
        self.temperature = check_real(temperature, "temperature", minimum=0.0, strict=True)
        self.alpha = check_real(alpha, "alpha", minimum=0.0, maximum=1.0)
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)

    def extra_repr(self):
        return f"temperature={self.temperature:.4g}, alpha={self.alpha:.4g}, reduction={self.reduction!r}"

    @property
    def needs_nat_logits(self):
        """Whether ``forward`` uses the student's clean logits (only for the CE term, alpha < 1)."""
        return self.alpha < 1

    def forward(self, adv_logits, nat_logits, teacher_logits, labels, sample_weight=None):
        """The ARD loss of one batch.

        Args:
            adv_logits: (B, C) student logits (train mode) on the adversarial inputs.
            nat_logits: (B, C) student logits (train mode) on the clean inputs; may be None when alpha = 1.
            teacher_logits: (B, C) teacher logits on the clean inputs.
            labels: (B,) integer labels in [0, C).
            sample_weight: (B,) per-sample weights (e.g. ``FairReweight.sample_weight(labels)``), or None.

        Returns:
            Tensor: the scalar loss, fp32 (fp64 for fp64 logits).
        """
        if nat_logits is None and self.needs_nat_logits:
            raise ValueError(f"nat_logits is needed for the CE term when alpha < 1 (alpha={self.alpha})")
        weight = check_batch(labels, sample_weight=sample_weight, adv_logits=adv_logits, nat_logits=nat_logits,
                             teacher_logits=teacher_logits)
        t = self.temperature
        loss = (self.alpha * t * t) * kd_kl_div(adv_logits, teacher_logits, reduction=self.reduction,
                                                sample_weight=weight, teacher_temperature=t, student_temperature=t)
        if self.needs_nat_logits:
            loss = loss + (1.0 - self.alpha) * weighted_ce(nat_logits, labels, weight)
        return loss
