"""Plain PyTorch statements of what every fastabsld op computes: the oracle of the tests.

Nothing in the library runs this code (the ops' fallbacks are their own); the tests compare every
backend with it, values and gradients. It favours clarity over speed and computes in fp32 (or fp64
for fp64 inputs).
"""

import math

import torch


def _per_sample(value, batch, like):
    """Broadcasts a number or a (B,) tensor to shape (B, 1, ..., 1) for ``like``."""
    if isinstance(value, torch.Tensor):
        return value.to(like.device, like.dtype).reshape((batch,) + (1,) * (like.dim() - 1))
    return torch.full((batch,) + (1,) * (like.dim() - 1), float(value), dtype=like.dtype, device=like.device)


def _row_norm(t, batch):
    """L2 norm of each sample of ``t`` (B, ...) as a (B,) tensor; zeros for empty samples or B = 0."""
    return t.reshape(batch, math.prod(t.shape[1:])).norm(p=2, dim=1)


def _row_scale(t, batch):
    """The largest |element| of each sample of ``t`` as (B,), or 1 where it is 0, inf, NaN or empty."""
    flat = t.reshape(batch, math.prod(t.shape[1:]))
    if flat.numel() == 0:
        return torch.ones(batch, dtype=t.dtype, device=t.device)
    scale = flat.abs().amax(dim=1)
    return torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))


def pgd_step(x_adv, x, grad, alpha, eps, norm="linf", clamp=(0.0, 1.0)):
    """One PGD ascent step with projection, per sample over all non-batch dimensions.

    Args:
        x_adv: current adversarial inputs, shape (B, ...).
        x: clean inputs, same shape.
        grad: gradient of the attack loss at ``x_adv``, same shape.
        alpha: step size, a number or a (B,) tensor.
        eps: radius of the ball around ``x``, a number or a (B,) tensor.
        norm: ``"linf"`` (sign step, box projection) or ``"l2"`` (normalised step, ball projection).
        clamp: (min, max) of the valid input range.

    Returns:
        Tensor: the next adversarial inputs, in ``x_adv``'s dtype.
    """
    compute = torch.float64 if x_adv.dtype == torch.float64 else torch.float32
    xa, x0, g = (t.to(compute) for t in (x_adv, x, grad))
    batch = xa.shape[0]
    a = _per_sample(alpha, batch, xa)
    e = _per_sample(eps, batch, xa)
    if norm == "linf":
        delta = torch.minimum(torch.maximum(xa + a * torch.sign(g) - x0, -e), e)
    elif norm == "l2":
        g_scale = _row_scale(g, batch).reshape(a.shape)
        # g / (||g|| + 1e-10), with g scaled by its largest element so that ||g|| cannot overflow.
        g_unit = (g / g_scale) / (_row_norm(g / g_scale, batch).reshape(a.shape) + 1e-10 / g_scale)
        stepped = xa + a * g_unit
        delta = stepped - x0
        d_scale = _row_scale(delta, batch).reshape(a.shape)
        d_norm = d_scale * _row_norm(delta / d_scale, batch).reshape(a.shape)
        factor = torch.where(d_norm > 0, e / d_norm, torch.ones_like(d_norm)).clamp(max=1.0)
        delta = delta * factor
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return torch.clamp(x0 + delta, clamp[0], clamp[1]).to(x_adv.dtype)


REDUCTIONS = ("none", "sum", "batchmean", "mean")


def row_temperature(temperature, labels, batch, num_classes, name="temperature"):
    """Resolves a temperature argument to one value per row.

    Args:
        temperature: a number or a 0-d tensor (every row); a (C,) tensor, one value per class,
            gathered by ``labels`` (which it needs); or a (B, 1) tensor, one value per row.
        labels: (B,) integer class labels or None. Ignored rows may hold any value.
        batch: B.
        num_classes: C.
        name: the argument's name for error messages.

    Returns:
        Tensor: (B, 1) or 0-d fp32/fp64 tensor of temperatures (a number becomes a 0-d tensor).
    """
    if not isinstance(temperature, torch.Tensor):
        return torch.tensor(float(temperature), dtype=torch.float64)
    if temperature.dim() == 0:
        return temperature
    if temperature.dim() == 2:
        if tuple(temperature.shape) != (batch, 1):
            raise ValueError(f"{name} per row must have shape (B, 1) = ({batch}, 1), got {tuple(temperature.shape)}")
        return temperature
    if temperature.dim() != 1:
        raise ValueError(f"{name} must be a number, a 0-d, (C,) or (B, 1) tensor, got shape {tuple(temperature.shape)}")
    if labels is None:
        raise ValueError(f"{name} of shape (C,) is per class and needs labels; pass a (B, 1) tensor for one "
                         "temperature per row")
    if temperature.shape[0] != num_classes:
        raise ValueError(f"{name} per class must have length C={num_classes}, got {temperature.shape[0]}")
    return temperature[labels.clamp(0, num_classes - 1)].reshape(batch, 1)


def row_weight(weight, sample_weight, labels, batch, dtype, device):
    """The weight of each row, ``weight[labels[i]] * sample_weight[i]`` (1 where an argument is None).

    Args:
        weight: (C,) per-class weights (needs labels) or None.
        sample_weight: a number, a 0-d or a (B,) tensor, or None.
        labels: (B,) labels or None. Ignored rows (any label) get some weight; the loss zeroes them.
        batch: B.
        dtype: the dtype to compute in.
        device: the logits' device.

    Returns:
        Tensor: (B,) row weights in ``dtype``.
    """
    w = torch.ones(batch, dtype=dtype, device=device)
    if weight is not None:
        if labels is None:
            raise ValueError("weight is per class and needs labels")
        w = w * weight.to(device, dtype)[labels.clamp(0, weight.shape[0] - 1)]
    if sample_weight is not None:
        if isinstance(sample_weight, torch.Tensor):
            w = w * sample_weight.to(device, dtype).expand(batch)
        else:
            w = w * float(sample_weight)
    return w


def kd_kl_div(student_logits, teacher_logits, labels=None, teacher_temperature=1.0, student_temperature=1.0,
              reduction="batchmean", ignore_index=-100, weight=None, sample_weight=None):
    """``w_i * KL(softmax(teacher_i / tau_t) || softmax(student_i / tau_s))`` per row, then reduced.

    The exact KL with 0 log 0 = 0: a teacher logit of -inf is a class ruled out. Computed in
    fp64 for fp64 inputs, else fp32; differentiable in both logits through autograd. Row i's
    weight is ``w_i = weight[labels[i]] * sample_weight[i]``; the reductions count rows, not
    weights. With no counted row (B = 0 or every row ignored) every reduction gives 0 (zeros for
    "none") and zero gradients.

    Args:
        student_logits: (B, C) logits of the student.
        teacher_logits: (B, C) logits of the teacher.
        labels: (B,) class labels or None; selects per-class temperatures and weights, and ignored rows.
        teacher_temperature: number, 0-d tensor, (C,) per class (with labels) or (B, 1) per row.
        student_temperature: likewise.
        reduction: "none" (per-row, shape (B,)), "sum", "batchmean" (sum / counted rows) or
            "mean" (sum / (counted rows * C)).
        ignore_index: rows whose label equals it contribute nothing and are not counted.
        weight: (C,) per-class weights or None.
        sample_weight: a number, a 0-d or (B,) tensor of per-row weights, or None.

    Returns:
        Tensor: the loss, fp32 (fp64 for fp64 inputs).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    batch, num_classes = student_logits.shape
    compute = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    s = student_logits.to(compute)
    t = teacher_logits.to(compute)
    tau_t = row_temperature(teacher_temperature, labels, batch, num_classes, "teacher_temperature")
    tau_s = row_temperature(student_temperature, labels, batch, num_classes, "student_temperature")
    log_p = torch.log_softmax(t / tau_t.to(s.device, compute), dim=1)
    log_q = torch.log_softmax(s / tau_s.to(s.device, compute), dim=1)
    p = log_p.exp()
    support = p > 0
    zero = torch.zeros((), dtype=compute, device=s.device)
    terms = p * (torch.where(support, log_p, zero) - torch.where(support, log_q, zero))
    rows = terms.sum(dim=1) * row_weight(weight, sample_weight, labels, batch, compute, s.device)
    if labels is not None:
        counted = labels != ignore_index
        rows = torch.where(counted, rows, zero)
        count = counted.sum().to(compute)
    else:
        count = torch.tensor(float(batch), dtype=compute, device=s.device)
    count = count.clamp(min=1)  # no counted row: the sum of no rows, 0, and zero gradients
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / count
    return rows.sum() / (count * num_classes)
