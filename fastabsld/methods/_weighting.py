"""Per-sample weighting of the methods' row losses: the one place the methods reduce weighted rows.

Every method module reduces its KL and CE rows through :func:`weighted_kl` and :func:`weighted_ce`.
Without weights they call the fused loss with its own reduction; with weights they take the
per-row losses (``reduction="none"``), multiply them by the weights and divide by the unweighted
denominator (B, or B * C for "mean"), so ``sum_i w_i * row_i / B`` is what the Fair-ARD scripts
compute. When ``kd_kl_div`` gains fused per-row weights, :func:`weighted_kl` is the only function
to switch.
"""

import torch
import torch.nn.functional as F

from fastabsld.ops.checks import compute_dtype, describe
from fastabsld.ops.kd_loss import kd_kl_div


def check_sample_weight(sample_weight, batch, device):
    """Raises ValueError unless ``sample_weight`` is None or a floating (B,) tensor on ``device``.

    Values are not checked (that would read them on the host).

    Args:
        sample_weight: the argument.
        batch: B, the rows of the loss.
        device: the logits' device.

    Returns:
        Tensor or None: ``sample_weight``, detached.
    """
    if sample_weight is None:
        return None
    if not isinstance(sample_weight, torch.Tensor) or not sample_weight.dtype.is_floating_point \
            or tuple(sample_weight.shape) != (batch,):
        raise ValueError(f"sample_weight must be a floating-point tensor of shape ({batch},), got "
                         f"{describe(sample_weight)}")
    if sample_weight.device != device:
        raise ValueError(f"sample_weight ({sample_weight.device}) must be on the logits' device ({device})")
    return sample_weight.detach()


def _reduce(rows, reduction, num_classes, sample_weight):
    rows = rows * sample_weight.to(rows.dtype)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (rows.shape[0] * (num_classes if reduction == "mean" else 1))


def weighted_kl(student_logits, teacher_logits, *, reduction, sample_weight=None, labels=None,
                teacher_temperature=1.0, student_temperature=1.0):
    """``kd_kl_div`` with each row's KL multiplied by ``sample_weight[i]`` before the reduction.

    Args:
        student_logits: (B, C) student logits.
        teacher_logits: (B, C) logits of the target distribution (gradients flow to it if it requires grad).
        reduction: "none", "sum", "batchmean" (sum / B) or "mean" (sum / (B * C)).
        sample_weight: (B,) weights (already checked), or None for the plain fused reduction.
        labels: (B,) labels for per-class temperatures, or None.
        teacher_temperature: as in ``kd_kl_div``.
        student_temperature: as in ``kd_kl_div``.

    Returns:
        Tensor: the (weighted) loss, fp32 (fp64 for fp64 logits).
    """
    kwargs = dict(labels=labels, teacher_temperature=teacher_temperature, student_temperature=student_temperature)
    if sample_weight is None:
        return kd_kl_div(student_logits, teacher_logits, reduction=reduction, **kwargs)
    rows = kd_kl_div(student_logits, teacher_logits, reduction="none", **kwargs)
    return _reduce(rows, reduction, student_logits.shape[1], sample_weight)


def weighted_ce(logits, labels, sample_weight=None):
    """Cross-entropy averaged over the batch, each row multiplied by ``sample_weight[i]`` first.

    Args:
        logits: (B, C) logits.
        labels: (B,) integer labels.
        sample_weight: (B,) weights (already checked), or None.

    Returns:
        Tensor: ``sum_i w_i CE_i / B`` (the plain mean without weights), fp32 (fp64 for fp64 logits).
    """
    logits = logits.to(compute_dtype(logits))
    if sample_weight is None:
        return F.cross_entropy(logits, labels)
    rows = F.cross_entropy(logits, labels, reduction="none")
    return _reduce(rows, "batchmean", logits.shape[1], sample_weight)
