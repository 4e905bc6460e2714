"""Drop-in knowledge-distillation losses.

Note: until the fused kernels land, ``kd_kl_div`` runs the plain PyTorch math of
``fastabsld.reference`` (same API and results, slower).
"""

from fastabsld import reference


def kd_kl_div(student_logits, teacher_logits, *, labels=None, teacher_temperature=1.0, student_temperature=1.0,
              reduction="batchmean", ignore_index=-100):
    """KL divergence from the tempered teacher's to the tempered student's softmax.

    Args:
        student_logits: (B, C) logits.
        teacher_logits: (B, C) logits.
        labels: (B,) labels, selecting per-class temperatures and ignored rows.
        teacher_temperature: number, 0-d tensor, (C,) with labels, or (B,) without.
        student_temperature: likewise.
        reduction: "none", "sum", "batchmean" or "mean" (sum / (rows * C)).
        ignore_index: label of rows to leave out.

    Returns:
        Tensor: the loss.
    """
    return reference.kd_kl_div(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                               reduction, ignore_index)


from fastabsld.absld_loss import ABSLDLoss  # noqa: E402,F401  (re-exported: fastabsld.loss.ABSLDLoss)
