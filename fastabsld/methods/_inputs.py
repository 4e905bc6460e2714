"""The argument checks the method modules share at their boundary: labels, logits of one batch, sample weights."""

from fastabsld.methods._weighting import check_sample_weight
from fastabsld.ops.checks import check_label_range, describe, is_integer_tensor


def check_batch(labels, num_classes=None, sample_weight=None, **logits):
    """Checks one batch's labels and logits; returns the checked sample weights.

    Args:
        labels: (B,) integer labels, each in [0, C) (checked on CPU tensors only: no host sync elsewhere).
        num_classes: C, or None to take it from the first logits.
        sample_weight: (B,) floating weights on the logits' device, or None.
        **logits: name -> (B, C) logits, or None for an absent optional input (skipped).

    Returns:
        Tensor or None: ``sample_weight`` detached.

    Raises:
        ValueError: naming the argument whose shape, dtype or device is wrong, or a CPU label outside [0, C).
    """
    if not is_integer_tensor(labels) or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D integer tensor, got {describe(labels)}")
    given = {name: value for name, value in logits.items() if value is not None}
    first = next(iter(given.values()))
    if num_classes is None:
        num_classes = first.shape[-1] if first.dim() == 2 else -1
    expected = (labels.shape[0], num_classes)
    for name, value in given.items():
        if value.dim() != 2 or tuple(value.shape) != expected or not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating-point logits of shape (B, C) = {expected} for labels of shape "
                             f"{tuple(labels.shape)}, got {describe(value)}")
        if value.device != labels.device:
            raise ValueError(f"{name} ({value.device}) and labels ({labels.device}) must be on one device")
    # -100 too: these losses have no ignore_index.
    check_label_range(labels, num_classes)
    return check_sample_weight(sample_weight, labels.shape[0], labels.device)
