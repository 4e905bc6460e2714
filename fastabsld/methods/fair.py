"""The class re-weighting of Fair-ARD (Yue et al., NeurIPS 2023, "Revisiting Adversarial Robustness
Distillation from the Perspective of Robust Fairness"), for any distillation loss.

Fair-ARD gives a class more weight the more vulnerable its samples are, measured by how long they
stay correctly classified along the student's own attack (the geometry-aware step count of GAIRAT).
With the attack's points x_i^(0), ..., x_i^(K-1) (the points whose gradients the K steps take)::

    kappa_i   = #{ k < K : argmax S(x_i^(k)) = y_i }        (steps sample i is still robust)
    kappa_c   = mean of kappa_i over the samples of class c in the epoch
    w_c       = (1 / (kappa_c + eps)) ** beta                (eps = 1e-5, beta = 2)
    w_c      <- clamp(C * w_c / sum_j w_j, 5/6, 5/2)          (normalised to sum C, then clamped)

The weights start at 1, are recomputed once per epoch from that epoch's counts, and multiply the
per-sample rows of every term of the method's loss (``loss = (1/B) sum_i w_{y_i} l_i``).

The official scripts (``NISP-official/Fair-ARD``: ``Fair-ARD.py``, ``Fair-IAD.py``, ``Fair-RSLAD.py``),
which this module follows:

- kappa is counted inside the attack loop from the logits the step differentiates (before the step),
  so the final point x^(K) is not counted; Fair-ARD / Fair-IAD count on the student in train mode
  with the CE attack (uniform start), Fair-RSLAD in eval mode with RSLAD's KL attack (0.001 N(0,1)).
- ``Kappa_total`` is summed per class over the epoch and divided by ``len(dataset) / C``, the mean
  per class of a balanced data set. Here it is divided by the number of samples of each class seen
  in the epoch (the same on a balanced set; right on an imbalanced one and under a distributed
  sampler's padding). A class with no sample in the epoch gets kappa = 0, as the script's division
  gives.
- Fair-RSLAD uses ``(1 / kappa) ** beta`` without eps (infinite for a class never robust); the
  Fair-ARD and Fair-IAD scripts, and this module, add eps = 1e-5.
- The scripts' per-sample Python loops (``if predict[p] == targets[p]``: a host sync per sample and
  step) become one ``index_add_`` per attack step on the device here.

The normalisation is computed as ``C * softmax(-beta * log(kappa + eps))``, the same numbers without
the overflow of ``(kappa + eps) ** -beta`` for large beta. An epoch that saw no sample leaves the
weights unchanged.
"""

import torch
from torch import nn

from fastabsld.ops.checks import check_int, check_label_range, check_real, compute_dtype, describe, is_integer_tensor


class FairReweight(nn.Module):
    """Fair-ARD class weights from the per-step robustness of each class's samples, kept on the device.

    Per batch: wrap the attack's loss with :meth:`track` (it counts the batch's samples and, at every
    attack step, which of them are still classified correctly), and pass
    :meth:`sample_weight` ``(labels)`` to the method's loss. Once per epoch: :meth:`update_weights`.
    Counting happens in training mode only (like ``ABSLDLoss``'s risks).

    Buffers (saved in ``state_dict``): ``class_weight`` (C,) the weights in use; ``robust_steps``
    (C,) int64, the summed kappa of each class this epoch; ``class_count`` (C,) int64, its samples.

    Args:
        num_classes: C >= 1.
        beta: exponent of the inverse robust time (2 in the paper).
        weight_min: lower clamp of the normalised weights (5/6).
        weight_max: upper clamp (5/2).
        eps: added to the mean robust time before the inversion (1e-5).
    """

    def __init__(self, num_classes, *, beta=2.0, weight_min=5 / 6, weight_max=5 / 2, eps=1e-5):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", minimum=1)
        self.beta = check_real(beta, "beta", minimum=0.0)
        self.weight_min = check_real(weight_min, "weight_min", minimum=0.0, strict=True)
        self.weight_max = check_real(weight_max, "weight_max", minimum=self.weight_min)
        self.eps = check_real(eps, "eps", minimum=0.0, strict=True)
        self.register_buffer("class_weight", torch.ones(num_classes))
        self.register_buffer("robust_steps", torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("class_count", torch.zeros(num_classes, dtype=torch.int64))

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, beta={self.beta:.4g}, weight=[{self.weight_min:.4g}, "
                f"{self.weight_max:.4g}], eps={self.eps:.3g}")

    def _check_labels(self, labels):
        if not is_integer_tensor(labels) or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D integer tensor, got {describe(labels)}")
        if labels.device != self.class_weight.device:
            raise ValueError(f"labels ({labels.device}) must be on the module's device ({self.class_weight.device})")
        check_label_range(labels, self.num_classes)

    def sample_weight(self, labels):
        """The weight of each sample: ``class_weight[labels]``.

        Args:
            labels: (B,) integer labels in [0, C), on the module's device.

        Returns:
            Tensor: (B,) weights (a new tensor, no grad).
        """
        self._check_labels(labels)
        return self.class_weight.index_select(0, labels.long())

    def track(self, loss_fn, labels):
        """Wraps an attack loss so that each attack step records which samples are still classified correctly.

        In training mode, the batch's samples are counted in ``class_count`` now, and every call of the
        returned function (one per attack step of ``fastabsld.attack.pgd``/``pgd_loop``) adds
        ``argmax(logits) == labels`` to ``robust_steps`` per class, on the device. In eval mode
        ``loss_fn`` is returned unchanged and nothing is counted.

        Args:
            loss_fn: the attack's ``loss_fn(logits) -> scalar``.
            labels: (B,) integer labels of the attacked batch, on the module's device.

        Returns:
            callable: ``loss_fn`` that also counts.
        """
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self._check_labels(labels)
        if not self.training:
            return loss_fn
        labels = labels.long()
        with torch.no_grad():
            self.class_count.index_add_(0, labels, torch.ones_like(labels))

        def tracked(logits):
            self._record_step(logits, labels)
            return loss_fn(logits)

        return tracked

    def record_step(self, logits, labels):
        """Adds one attack step's correctness (``argmax(logits) == labels``) to ``robust_steps`` per class.

        For attack loops other than ``fastabsld.attack``'s; :meth:`track` calls it at each step. Counts
        in training mode only; the samples themselves are counted by :meth:`track` or :meth:`record_batch`.

        Args:
            logits: (B, C) logits of the attacked model at the step's point.
            labels: (B,) integer labels.
        """
        self._check_labels(labels)
        if tuple(logits.shape) != (labels.shape[0], self.num_classes):
            raise ValueError(f"logits must have shape (B, C) = {(labels.shape[0], self.num_classes)}, got "
                             f"{tuple(logits.shape)}")
        if self.training:
            self._record_step(logits, labels.long())

    def record_batch(self, labels):
        """Counts a batch's samples in ``class_count`` (what :meth:`track` does for its batch).

        Args:
            labels: (B,) integer labels.
        """
        self._check_labels(labels)
        if self.training:
            with torch.no_grad():
                labels = labels.long()
                self.class_count.index_add_(0, labels, torch.ones_like(labels))

    def _record_step(self, logits, labels):
        with torch.no_grad():
            robust = logits.detach().argmax(dim=1) == labels
            self.robust_steps.index_add_(0, labels, robust.to(torch.int64))

    def robust_time(self, robust_steps=None, class_count=None):
        """The mean robust time of each class, ``robust_steps / class_count`` (0 for a class not seen).

        Args:
            robust_steps: (C,) summed counts, or None for this module's.
            class_count: (C,) samples per class, or None for this module's.

        Returns:
            Tensor: (C,) floating, in ``class_weight``'s compute dtype.
        """
        steps = self.robust_steps if robust_steps is None else robust_steps
        count = self.class_count if class_count is None else class_count
        compute = compute_dtype(self.class_weight)
        return steps.to(compute) / count.clamp(min=1).to(compute)

    def weights_from(self, robust_time):
        """The clamped, normalised class weights of a (C,) mean robust time (no host sync).

        Args:
            robust_time: (C,) mean robust time per class.

        Returns:
            Tensor: (C,) weights, ``clamp(C * softmax(-beta * log(robust_time + eps)), weight_min, weight_max)``.
        """
        logits = -self.beta * torch.log(robust_time + self.eps)
        weights = self.num_classes * torch.softmax(logits, dim=0)
        return torch.clamp(weights, self.weight_min, self.weight_max)

    @torch.no_grad()
    def update_weights(self, group=None):
        """The once-per-epoch update of ``class_weight`` from the epoch's counts; resets the counts.

        Under ``torch.distributed`` (when initialised) the counts are first summed over the ranks of
        ``group``, so every rank computes the same weights. Call it on every rank. An epoch without
        samples leaves the weights unchanged.

        Args:
            group: process group for the all-reduce, or None for the default group.
        """
        counts = torch.stack([self.robust_steps, self.class_count])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, group=group)
        weights = self.weights_from(self.robust_time(counts[0], counts[1]))
        seen = counts[1].sum() > 0
        self.class_weight.copy_(torch.where(seen, weights.to(self.class_weight.dtype), self.class_weight))
        self.robust_steps.zero_()
        self.class_count.zero_()
