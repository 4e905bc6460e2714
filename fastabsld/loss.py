"""Drop-in knowledge-distillation losses: :func:`kd_kl_div`, its module form :class:`KDLoss`, and ABSLD's loss.

``kd_kl_div`` is the fused op of ``fastabsld.ops.kd_loss`` (one pass gives the loss and its
gradient); ``ABSLDLoss`` (``fastabsld.methods.absld``) holds the class-wise temperatures of ABSLD.
"""

import torch

from fastabsld.methods.absld import ABSLDLoss
from fastabsld.ops.checks import check_choice, check_int, check_real
from fastabsld.ops.kd_loss import REDUCTIONS, kd_kl_div

__all__ = ["ABSLDLoss", "KDLoss", "kd_kl_div"]


class KDLoss(torch.nn.Module):
    """The module form of :func:`kd_kl_div`; temperature tensors are buffers (they follow ``.to``).

    Args:
        teacher_temperature: number, 0-d tensor, or 1-D tensor (length C with labels, B without).
        student_temperature: likewise.
        reduction: "none", "sum", "batchmean" or "mean".
        ignore_index: label of rows to leave out.
    """

    def __init__(self, teacher_temperature=1.0, student_temperature=1.0, reduction="batchmean", ignore_index=-100):
        super().__init__()
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.ignore_index = check_int(ignore_index, "ignore_index")
        for name, value in (("teacher_temperature", teacher_temperature),
                            ("student_temperature", student_temperature)):
            if isinstance(value, torch.Tensor):
                self.register_buffer(name, value.detach().clone())
            else:
                setattr(self, name, check_real(value, name, minimum=0.0, strict=True))

    def forward(self, student_logits, teacher_logits, labels=None):
        """Computes the loss.

        Args:
            student_logits: (B, C) student logits.
            teacher_logits: (B, C) teacher logits.
            labels: (B,) integer labels or None.

        Returns:
            Tensor: the loss (see :func:`kd_kl_div`).
        """
        return kd_kl_div(student_logits, teacher_logits, labels=labels, teacher_temperature=self.teacher_temperature,
                         student_temperature=self.student_temperature, reduction=self.reduction,
                         ignore_index=self.ignore_index)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}"
