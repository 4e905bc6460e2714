"""Drop-in knowledge-distillation losses: :func:`kd_kl_div`, its module form :class:`KDLoss`, and ABSLD's loss.

``kd_kl_div`` is the fused op of ``fastabsld.ops.kd_loss`` (one pass gives the loss and its
gradient); ``ABSLDLoss`` (``fastabsld.methods.absld``) holds the class-wise temperatures of ABSLD.
"""

import torch

from fastabsld.methods.absld import ABSLDLoss
from fastabsld.ops.checks import check_choice, check_int, check_real
from fastabsld.ops.kd_loss import REDUCTIONS, kd_kl_div

__all__ = ["ABSLDLoss", "KDLoss", "kd_kl_div"]


def _check_temperature_argument(value, name):
    """A temperature of the module: a positive finite number, or a 0-d, (C,) or (..., 1) floating-point tensor."""
    if not isinstance(value, torch.Tensor):
        return check_real(value, name, minimum=0.0, strict=True)
    if value.dtype.is_complex or not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if not (value.dim() in (0, 1) or value.shape[-1] == 1):
        raise ValueError(f"{name} must be a number or a 0-d, (C,) (per class) or (..., 1) (per row, the logits' "
                         f"leading shape) tensor, got shape {tuple(value.shape)}")
    if not bool(((value > 0) & torch.isfinite(value)).all()):
        raise ValueError(f"{name} must hold positive finite values")
    return value.detach().clone()


def _check_weight_argument(value):
    """The module's per-class weight: None or a (C,) floating-point tensor."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"weight must be None or a (C,) tensor, got {type(value).__name__}")
    if value.dtype.is_complex or not value.dtype.is_floating_point:
        raise ValueError(f"weight must be a floating-point tensor, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"weight must have shape (C,), got shape {tuple(value.shape)}")
    if not bool(((value >= 0) & torch.isfinite(value)).all()):
        raise ValueError("weight must hold non-negative finite values")
    return value.detach().clone()


class KDLoss(torch.nn.Module):
    """The module form of :func:`kd_kl_div`; temperature and weight tensors are buffers (they follow ``.to``).

    Arguments are checked here once (kinds, dtypes, values, reduction); shapes against the logits
    are checked by :func:`kd_kl_div` on each call.

    Args:
        teacher_temperature: a positive finite number, a 0-d tensor, a (C,) tensor (per class,
            needs labels) or a (..., 1) tensor (per row: the logits' leading shape and a trailing
            1, (B, 1) for (B, C) logits); tensors floating-point.
        student_temperature: likewise.
        reduction: "none", "sum", "batchmean" or "mean".
        ignore_index: label of rows to leave out.
        weight: None or a (C,) floating-point tensor of per-class weights (needs labels).
    """

    def __init__(self, teacher_temperature=1.0, student_temperature=1.0, reduction="batchmean", ignore_index=-100,
                 weight=None):
        super().__init__()
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.ignore_index = check_int(ignore_index, "ignore_index")
        for name, value in (("teacher_temperature", teacher_temperature),
                            ("student_temperature", student_temperature)):
            value = _check_temperature_argument(value, name)
            if isinstance(value, torch.Tensor):
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)
        self.register_buffer("weight", _check_weight_argument(weight))

    def forward(self, student_logits, teacher_logits, labels=None, sample_weight=None):
        """Computes the loss.

        Args:
            student_logits: (..., C) student logits; the leading dimensions are rows.
            teacher_logits: (..., C) teacher logits.
            labels: integer labels of the leading shape, or None.
            sample_weight: None, a non-negative number, or a 0-d tensor or one of the leading
                shape, of per-row weights.

        Returns:
            Tensor: the loss (see :func:`kd_kl_div`).
        """
        return kd_kl_div(student_logits, teacher_logits, labels=labels, teacher_temperature=self.teacher_temperature,
                         student_temperature=self.student_temperature, reduction=self.reduction,
                         ignore_index=self.ignore_index, weight=self.weight, sample_weight=sample_weight)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}"
