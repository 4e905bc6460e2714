"""IAD, Introspective Adversarial Distillation (Zhu et al., ICLR 2022, "Reliable Adversarial Distillation
with Unreliable Teachers"), in its ARD-based form IAD-I.

The idea (paper): the student trusts the teacher's soft label of a sample only as far as the teacher
is right on the student's adversarial example x~ of it. The trust is the teacher's probability of
the true class there, raised to a power::

    a(x~, y) = P_T(x~)_y ^ beta          (P_T = softmax of the untempered teacher logits; beta = 0.1)

and the remaining ``1 - a`` goes to the student's own clean prediction ("self-introspection")::

    KL(S(x) || S(x~)) = sum_c S(x)_c log(S(x)_c / S(x~)_c)

so a teacher that is good on x~ is fully trusted, one that is not hands over to the student.

The official IAD-I script (``ZFancy/IAD``, ``IAD-I.py``, the loss of its ``train`` function), which this
module follows, with t the temperature, alpha the distillation weight and ``begin`` the warm-up::

    epoch <  begin:  loss = alpha t^2 (1/B) sum_i KL(T^t(x_i) || S^t(x~_i)) + (1 - alpha) CE_mean(S(x), y)
    epoch >= begin:  loss = alpha t^2 (1/B) sum_i KL(T^t(x_i) || S^t(x~_i))
                          + alpha (1/B) sum_i (1 - a_i) KL(S(x_i) || S(x~_i))
                          + (1 - alpha) CE_mean(S(x), y)

- The KLs are ``nn.KLDivLoss(reduce=False)`` summed over the classes and divided by B (the
  per-sample mean, "batchmean"), unlike Goldblum's ARD (mean over B * C).
- During the warm-up it is ARD with that reduction. Defaults: t = 1, alpha = 1, beta = 0.1, begin = 60
  (of 200 epochs).
- ``a_i`` is read from the teacher (eval mode) on the adversarial batch, one ``.item()`` per sample:
  a constant of the loss. Here it is computed on the device, detached, without a host sync.
- The target of the self-introspection term, ``softmax(S(x))``, is a fresh student forward on the
  clean batch in train mode and is not detached: the gradient flows into both S(x) and S(x~). Here
  ``nat_logits`` (with its graph) is that forward; the value is the same.
- The teacher term is *not* multiplied by ``a_i`` in the IAD-I script (both stored versions), while
  the IAD-II script (the AKD^2-based variant) multiplies its teacher term by ``a_i``, and the
  paper's description (the teacher's label is dropped where the teacher is wrong) implies that weight.
  ``weight_teacher_term=False`` (default) reproduces the IAD-I script; ``True`` weights the teacher
  term by ``a_i`` as well.
- The attack is ARD's (:func:`fastabsld.methods.ard.ard_attack_loss`: the student's CE, uniform start,
  student in train mode in the script).
- Fair-IAD (NISP-official/Fair-ARD) multiplies every term's rows by the class weight of the sample
  (``sample_weight`` here) and computes its CE term on S(x~) instead of S(x); with the default alpha = 1
  the CE term is absent in both.
"""

import torch
from torch import nn

from fastabsld.methods._inputs import check_batch
from fastabsld.methods._weighting import weighted_ce
from fastabsld.methods.ard import RANDOM_START, ard_attack_loss
from fastabsld.ops.checks import check_int, check_real, compute_dtype
from fastabsld.ops.kd_loss import kd_kl_div

__all__ = ["IADLoss", "RANDOM_START", "ard_attack_loss"]


class IADLoss(nn.Module):
    """The IAD-I loss with its warm-up: ARD until ``warmup_epochs``, then introspective.

    The epoch is set by the caller once per epoch (:meth:`set_epoch`) and saved in ``state_dict``.

    Args:
        temperature: the distillation temperature t of the teacher term (1 in the official script).
        alpha: weight of the distillation terms (1 in the official script: no CE term).
        beta: exponent of the teacher's true-class probability (0.1).
        warmup_epochs: epochs (counted from 0) before the introspection starts (60).
        weight_teacher_term: also multiply the teacher term by the trust ``a_i`` (not in the IAD-I script).
    """

    def __init__(self, *, temperature=1.0, alpha=1.0, beta=0.1, warmup_epochs=60, weight_teacher_term=False):
        super().__init__()
        self.temperature = check_real(temperature, "temperature", minimum=0.0, strict=True)
        self.alpha = check_real(alpha, "alpha", minimum=0.0, maximum=1.0)
        self.beta = check_real(beta, "beta", minimum=0.0)
        self.warmup_epochs = check_int(warmup_epochs, "warmup_epochs", minimum=0)
        if not isinstance(weight_teacher_term, bool):
            raise ValueError(f"weight_teacher_term must be a bool, got {weight_teacher_term!r}")
        self.weight_teacher_term = weight_teacher_term
        self.epoch = 0

    def extra_repr(self):
        return (f"temperature={self.temperature:.4g}, alpha={self.alpha:.4g}, beta={self.beta:.4g}, "
                f"warmup_epochs={self.warmup_epochs}, weight_teacher_term={self.weight_teacher_term}, "
                f"epoch={self.epoch}")

    def get_extra_state(self):
        return {"epoch": self.epoch}

    def set_extra_state(self, state):
        self.epoch = check_int(state["epoch"], "epoch", minimum=0)

    def set_epoch(self, epoch):
        """Sets the epoch (from 0) of the following batches; introspection starts at ``warmup_epochs``.

        Args:
            epoch: the epoch index, a non-negative integer.
        """
        self.epoch = check_int(epoch, "epoch", minimum=0)

    @property
    def introspective(self):
        """Whether this epoch is past the warm-up (the self-introspection term is on)."""
        return self.epoch >= self.warmup_epochs

    @property
    def needs_teacher_adv_logits(self):
        """Whether ``forward`` needs the teacher's logits on the adversarial batch (after the warm-up)."""
        return self.introspective

    @property
    def needs_nat_logits(self):
        """Whether ``forward`` needs the student's clean logits (self-introspection term, or CE when alpha < 1)."""
        return self.introspective or self.alpha < 1

    def trust(self, teacher_adv_logits, labels):
        """The per-sample trust in the teacher, ``softmax(teacher_adv_logits)[i, y_i] ** beta``, detached.

        Args:
            teacher_adv_logits: (B, C) teacher logits on the adversarial inputs.
            labels: (B,) integer labels in [0, C).

        Returns:
            Tensor: (B,) values in [0, 1], fp32 (fp64 for fp64 logits).
        """
        check_batch(labels, teacher_adv_logits=teacher_adv_logits)
        return self._trust(teacher_adv_logits, labels)

    def _trust(self, teacher_adv_logits, labels):
        logits = teacher_adv_logits.detach().to(compute_dtype(teacher_adv_logits))
        probs = torch.softmax(logits, dim=1).gather(1, labels.long().unsqueeze(1)).squeeze(1)
        return probs.pow(self.beta)

    def forward(self, adv_logits, nat_logits, teacher_logits, labels, teacher_adv_logits=None, sample_weight=None):
        """The IAD-I loss of one batch at the current epoch.

        Args:
            adv_logits: (B, C) student logits (train mode) on the adversarial inputs.
            nat_logits: (B, C) student logits (train mode) on the clean inputs, with their graph; may be None
                during the warm-up when alpha = 1 (see :attr:`needs_nat_logits`).
            teacher_logits: (B, C) teacher logits on the clean inputs.
            labels: (B,) integer labels in [0, C).
            teacher_adv_logits: (B, C) teacher logits on the adversarial inputs; needed after the warm-up.
            sample_weight: (B,) per-sample weights (Fair-IAD), or None.

        Returns:
            Tensor: the scalar loss, fp32 (fp64 for fp64 logits).
        """
        if nat_logits is None and self.needs_nat_logits:
            raise ValueError("nat_logits is needed after the warm-up and whenever alpha < 1 "
                             f"(epoch={self.epoch}, warmup_epochs={self.warmup_epochs}, alpha={self.alpha})")
        if teacher_adv_logits is None and self.needs_teacher_adv_logits:
            raise ValueError(f"teacher_adv_logits is needed after the warm-up (epoch={self.epoch}, "
                             f"warmup_epochs={self.warmup_epochs})")
        if not self.introspective:
            teacher_adv_logits = None
        weight = check_batch(labels, sample_weight=sample_weight, adv_logits=adv_logits, nat_logits=nat_logits,
                             teacher_logits=teacher_logits, teacher_adv_logits=teacher_adv_logits)
        t = self.temperature
        teacher_weight, self_weight = weight, None
        if self.introspective:
            trust = self._trust(teacher_adv_logits, labels)
            distrust = 1.0 - trust
            self_weight = distrust if weight is None else distrust * weight.to(distrust.dtype)
            if self.weight_teacher_term:
                teacher_weight = trust if weight is None else trust * weight.to(trust.dtype)
        loss = (self.alpha * t * t) * kd_kl_div(adv_logits, teacher_logits, reduction="batchmean",
                                                sample_weight=teacher_weight, teacher_temperature=t,
                                                student_temperature=t)
        if self.introspective:
            loss = loss + self.alpha * kd_kl_div(adv_logits, nat_logits, reduction="batchmean",
                                                 sample_weight=self_weight)
        if self.alpha < 1:
            loss = loss + (1.0 - self.alpha) * weighted_ce(nat_logits, labels, weight)
        return loss
