"""Per-sample weighting of the methods' row losses: the one place the methods reduce weighted rows.

Every method module reduces its KL and CE rows through :func:`weighted_kl` and :func:`weighted_ce`.
Both divide the weighted sum by the unweighted denominator (B, or B * C for "mean"), so
``sum_i w_i * row_i / B`` is what the Fair-ARD scripts compute. :func:`weighted_kl` is the fused
loss with its per-row ``sample_weight`` (the weights scale the rows and the gradients inside the
kernel); :func:`weighted_ce` weights the rows of ``F.cross_entropy``.
"""

import torch
import torch.nn.functional as F

from fastabsld.ops.checks import compute_dtype, describe
from fastabsld.ops.kd_loss import kd_kl_div


def check_sample_weight(sample_weight, batch, device):
    """Raises ValueError unless ``sample_weight`` is None or a floating (B,) tensor on ``device``.

    Values are not checked here (that would read them on the host); the fused loss checks them on
    CPU tensors (ValueError for a negative, NaN or infinite weight), where its kernel reads them anyway.

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


def weighted_kl(student_logits, teacher_logits, *, reduction, sample_weight=None, labels=None,
                teacher_temperature=1.0, student_temperature=1.0):
    """``kd_kl_div`` with each row's KL multiplied by ``sample_weight[i]`` before the reduction.

    The fused loss applies the weights in its kernel; its reductions divide by the rows, not by
    the weights' sum.

    Args:
        student_logits: (B, C) student logits.
        teacher_logits: (B, C) logits of the target distribution (gradients flow to it if it requires grad).
        reduction: "none", "sum", "batchmean" (sum / B) or "mean" (sum / (B * C)).
        sample_weight: (B,) non-negative weights (already checked by ``check_sample_weight``), or None.
        labels: (B,) class labels (every one in [0, C): an ``ignore_index`` row would leave the
            denominator) for per-class temperatures, or None.
        teacher_temperature: as in ``kd_kl_div``.
        student_temperature: as in ``kd_kl_div``.

    Returns:
        Tensor: the (weighted) loss, fp32 (fp64 for fp64 logits).
    """
    return kd_kl_div(student_logits, teacher_logits, reduction=reduction, labels=labels,
                     teacher_temperature=teacher_temperature, student_temperature=student_temperature,
                     sample_weight=sample_weight)


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
    return (rows * sample_weight.to(rows.dtype)).sum() / rows.shape[0]
