"""Per-sample weighting of the methods' losses: the check of a ``sample_weight`` and the weighted cross-entropy.

The methods' KL terms take the fused loss's own ``sample_weight`` (``kd_kl_div``: the weights scale
the rows and the gradients inside the kernel; the reductions divide by the rows, not by the weights'
sum). Their cross-entropy terms go through :func:`weighted_ce`, which divides the weighted sum by B
likewise, so ``sum_i w_i * row_i / B`` is what the Fair-ARD scripts compute for every term.
"""

import torch
import torch.nn.functional as F

from fastabsld.ops.checks import compute_dtype, describe


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
