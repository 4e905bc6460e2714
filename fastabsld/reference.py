"""Plain PyTorch implementations of every fastabsld op.

These are the oracle of the tests and the fallback when ``fastabsld._C`` is not built. They
favour clarity over speed and compute in fp32 (or fp64 for fp64 inputs).
"""

import torch


def memory_format_of(tensor):
    """The memory format that ``tensor`` is dense in: channels_last(_3d) or contiguous.

    Args:
        tensor: any tensor.

    Returns:
        torch.memory_format: the format to give tensors derived from ``tensor``.
    """
    if not tensor.is_contiguous():
        if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _per_sample(value, batch, like):
    """Broadcasts a number or a (B,) tensor to shape (B, 1, ..., 1) for ``like``."""
    if isinstance(value, torch.Tensor):
        return value.to(like.device, like.dtype).reshape((batch,) + (1,) * (like.dim() - 1))
    return torch.full((batch,) + (1,) * (like.dim() - 1), float(value), dtype=like.dtype, device=like.device)


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
        g_norm = g.reshape(batch, -1).norm(p=2, dim=1).reshape(a.shape)
        stepped = xa + a * g / (g_norm + 1e-10)
        delta = stepped - x0
        d_norm = delta.reshape(batch, -1).norm(p=2, dim=1).reshape(a.shape)
        factor = torch.where(d_norm > 0, e / d_norm, torch.ones_like(d_norm)).clamp(max=1.0)
        delta = delta * factor
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return torch.clamp(x0 + delta, clamp[0], clamp[1]).to(x_adv.dtype)
