"""Class-wise accuracy and the fairness measures of ABSLD: worst-class accuracy and NSD.

Per-class accuracies are fp64 tensors; a class without samples holds NaN, and the aggregations
skip it. A row of logits holding NaN or an infinity predicts no class (``NO_CLASS``, -1, see
:func:`predicted_classes`): it counts as wrong, never as the class its argmax happens to be.
Nothing here synchronises with the host.
"""

import torch

from fastabsld.ops.checks import check_int, describe, is_integer_tensor

# The prediction of a row of logits that is not finite: no class, so never correct.
NO_CLASS = -1


def predicted_classes(logits):
    """The predicted class of each row of logits; ``NO_CLASS`` (-1) where a row holds NaN or an infinity.

    ``argmax`` of a NaN row is an arbitrary class (often 0), which would score a broken model as
    right on that class; a row with ``+inf`` has no single answer either. Both predict nothing.

    Args:
        logits: (B, C) tensor.

    Returns:
        Tensor: (B,) int64 classes in [0, C), or -1 for a non-finite row (same device, no host sync).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a (B, C) tensor, got {describe(logits)}")
    if not logits.is_floating_point():
        return logits.argmax(dim=1)
    finite = torch.isfinite(logits).all(dim=1)
    return torch.where(finite, logits.argmax(dim=1), torch.full_like(finite, NO_CLASS, dtype=torch.int64))


def _predictions(predictions_or_logits, labels):
    """(B,) predicted classes from (B,) predictions or (B, C) logits, checked against labels."""
    # Float or bool labels would be truncated into classes silently: refuse them.
    if not is_integer_tensor(labels):
        raise ValueError(f"labels must be an integer tensor, got {describe(labels)}")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
    if not isinstance(predictions_or_logits, torch.Tensor):
        raise ValueError(f"predictions_or_logits must be a tensor, got {describe(predictions_or_logits)}")
    if predictions_or_logits.dim() == 2:
        predictions = predicted_classes(predictions_or_logits)
    elif predictions_or_logits.dim() == 1:
        if not is_integer_tensor(predictions_or_logits):
            raise ValueError(f"predictions of shape (B,) must be integer classes, got "
                             f"{describe(predictions_or_logits)} (pass (B, C) logits to take their argmax)")
        predictions = predictions_or_logits
    else:
        raise ValueError(f"predictions must have shape (B,) or logits (B, C), got {tuple(predictions_or_logits.shape)}")
    if predictions.shape[0] != labels.shape[0]:
        raise ValueError(f"predictions/logits {tuple(predictions_or_logits.shape)} and labels "
                         f"{tuple(labels.shape)} disagree on the batch size")
    return predictions


def _check_num_classes(num_classes):
    check_int(num_classes, "num_classes", minimum=1)


def class_counts(predictions_or_logits, labels, num_classes):
    """Per-class numbers of correct predictions and of samples.

    Args:
        predictions_or_logits: (B,) predicted classes (-1: none) or (B, C) logits (a non-finite row
            counts as wrong).
        labels: (B,) integer labels in [0, num_classes).
        num_classes: C.

    Returns:
        tuple[Tensor, Tensor]: (C,) int64 correct counts and (C,) int64 sample counts.
    """
    _check_num_classes(num_classes)
    predictions = _predictions(predictions_or_logits, labels)
    labels = labels.to(torch.int64)
    if labels.device.type == "cpu" and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got values from "
                         f"{int(labels.min())} to {int(labels.max())}")
    total = torch.zeros(num_classes, dtype=torch.int64, device=labels.device)
    total.index_add_(0, labels, torch.ones_like(labels))
    correct = torch.zeros_like(total)
    correct.index_add_(0, labels, (predictions.to(labels.device) == labels).to(torch.int64))
    return correct, total


def accuracy_from_counts(correct, total):
    """Per-class accuracy ``correct / total``, NaN where a class has no samples.

    Args:
        correct: (C,) correct counts.
        total: (C,) sample counts.

    Returns:
        Tensor: (C,) fp64 accuracies in [0, 1].
    """
    total = total.to(torch.float64)
    return torch.where(total > 0, correct.to(torch.float64) / total.clamp(min=1), torch.full_like(total, float("nan")))


def per_class_accuracy(predictions_or_logits, labels, num_classes):
    """Accuracy of each class.

    Args:
        predictions_or_logits: (B,) predicted classes or (B, C) logits.
        labels: (B,) integer labels in [0, num_classes).
        num_classes: C.

    Returns:
        Tensor: (C,) fp64 accuracies; NaN for a class without samples.
    """
    return accuracy_from_counts(*class_counts(predictions_or_logits, labels, num_classes))


def _present(per_class_acc):
    if per_class_acc.dim() != 1:
        raise ValueError(f"per_class_acc must have shape (C,), got {tuple(per_class_acc.shape)}")
    return ~torch.isnan(per_class_acc)


def worst_class_accuracy(per_class_acc):
    """The lowest accuracy over the classes that have samples.

    Args:
        per_class_acc: (C,) accuracies, NaN for classes without samples.

    Returns:
        Tensor: 0-d; NaN when no class has samples.
    """
    present = _present(per_class_acc)
    lowest = torch.where(present, per_class_acc, torch.full_like(per_class_acc, float("inf"))).amin()
    return torch.where(present.any(), lowest, torch.full_like(lowest, float("nan")))


def nsd(per_class_acc):
    """Normalised standard deviation of the class accuracies: population std / mean.

    Lower is fairer. Classes without samples (NaN) are skipped.

    Args:
        per_class_acc: (C,) accuracies, NaN for classes without samples.

    Returns:
        Tensor: 0-d; NaN when no class has samples or the mean accuracy is 0.
    """
    present = _present(per_class_acc)
    count = present.sum().to(per_class_acc.dtype)
    values = torch.where(present, per_class_acc, torch.zeros_like(per_class_acc))
    mean = values.sum() / count
    variance = torch.where(present, (values - mean) ** 2, torch.zeros_like(values)).sum() / count
    return variance.sqrt() / mean


class ClassAccuracy:
    """Streaming per-class accuracy: counts kept on the device, read out at the end.

    Args:
        num_classes: C.
        device: device of the counters (default: CPU; moved to the labels' device on the first
            update when it was not given).
    """

    def __init__(self, num_classes, device=None):
        _check_num_classes(num_classes)
        self.num_classes = int(num_classes)
        self._device_given = device is not None
        self.correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.total = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def update(self, predictions_or_logits, labels):
        """Adds one batch.

        Args:
            predictions_or_logits: (B,) predicted classes or (B, C) logits.
            labels: (B,) integer labels in [0, C).
        """
        if not self._device_given and self.total.device != labels.device:
            self.correct, self.total = self.correct.to(labels.device), self.total.to(labels.device)
            self._device_given = True
        correct, total = class_counts(predictions_or_logits, labels.to(self.total.device), self.num_classes)
        self.correct += correct
        self.total += total

    def per_class(self):
        """Returns: Tensor: (C,) fp64 accuracies, NaN for classes without samples."""
        return accuracy_from_counts(self.correct, self.total)

    def accuracy(self):
        """Returns: Tensor: 0-d fp64 accuracy over all samples (NaN when there are none)."""
        total = self.total.sum().to(torch.float64)
        return self.correct.sum().to(torch.float64) / total

    def summary(self):
        """The figures as plain Python numbers (one host synchronisation).

        Returns:
            dict: ``average`` (accuracy over all samples), ``worst`` (worst-class accuracy),
            ``nsd`` (floats), ``per_class`` (list of C floats) and ``count`` (number of samples).
            Undefined figures are NaN: a class without samples, NSD at mean accuracy 0, all of them
            when there are no samples.
        """
        per_class = self.per_class()
        figures = torch.cat([torch.stack([self.accuracy(), worst_class_accuracy(per_class), nsd(per_class)]),
                             per_class]).cpu().tolist()
        return {"average": figures[0], "worst": figures[1], "nsd": figures[2], "per_class": figures[3:],
                "count": int(self.total.sum().cpu())}
