"""The PGD projection step as the custom op ``torch.ops.fastabsld.pgd_step``.

The schema is defined in C++ (``csrc/library.cpp``) with CPU and CUDA kernels. Without the
extension, the same schema is defined here with the reference implementation, so the op, its
fake kernel and ``torch.compile`` behave the same either way.
"""

import math
import numbers

import torch

from fastabsld import reference
from fastabsld._extension import HAS_EXTENSION

SCHEMA = (
    "pgd_step(Tensor x_adv, Tensor x, Tensor grad, Tensor? alpha_per_sample, "
    "Tensor? eps_per_sample, float alpha, float eps, str norm, float clamp_min, "
    "float clamp_max) -> Tensor"
)


def _reference_kernel(x_adv, x, grad, alpha_per_sample, eps_per_sample, alpha, eps, norm, clamp_min, clamp_max):
    a = alpha if alpha_per_sample is None else alpha_per_sample
    e = eps if eps_per_sample is None else eps_per_sample
    out = reference.pgd_step(x_adv, x, grad, a, e, norm, (clamp_min, clamp_max))
    return out.contiguous(memory_format=reference.memory_format_of(x_adv))


if not HAS_EXTENSION:
    _LIB = torch.library.Library("fastabsld", "DEF")
    _LIB.define(SCHEMA)
    _LIB.impl("pgd_step", _reference_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("fastabsld::pgd_step")
def _pgd_step_fake(x_adv, x, grad, alpha_per_sample, eps_per_sample, alpha, eps, norm, clamp_min, clamp_max):
    return torch.empty_like(x_adv, memory_format=reference.memory_format_of(x_adv))


def _check_radius(value, name, batch):
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return None, value
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a number or a tensor of shape ({batch},), got shape {tuple(value.shape)}")
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(torch.isnan(value).any()) or bool((value < 0).any()):
                raise ValueError(f"{name} must be non-negative and not NaN")
        return value, 0.0
    if not isinstance(value, numbers.Real) or math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return None, float(value)


def pgd_step(x_adv, x, grad, *, alpha, eps, norm="linf", clamp=(0.0, 1.0)):
    """Takes one PGD ascent step and projects it, per sample, in one pass.

    L-inf: ``clamp(x + clamp(x_adv + alpha * sign(grad) - x, -eps, eps), *clamp)``.

    Args:
        x_adv: current adversarial inputs, shape (B, ...), fp32/fp16/bf16, any layout.
        x: clean inputs, same shape.
        grad: gradient of the loss to maximise at ``x_adv``, same shape.
        alpha: step size: a non-negative number or a tensor of shape (B,).
        eps: radius: a non-negative number or a tensor of shape (B,).
        norm: ``"linf"`` or ``"l2"``.
        clamp: (min, max) of the valid input range.

    Returns:
        Tensor: the new adversarial inputs (a new tensor; the inputs are not modified).
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if x.shape != x_adv.shape or grad.shape != x_adv.shape:
        raise ValueError(
            f"x_adv {tuple(x_adv.shape)}, x {tuple(x.shape)} and grad {tuple(grad.shape)} must have the same shape"
        )
    lo, hi = float(clamp[0]), float(clamp[1])
    if lo > hi:
        raise ValueError(f"clamp min {lo} > max {hi}")
    batch = x_adv.shape[0]
    alpha_t, alpha_f = _check_radius(alpha, "alpha", batch)
    eps_t, eps_f = _check_radius(eps, "eps", batch)
    if isinstance(alpha_f, torch.Tensor):
        alpha_t, alpha_f = alpha_f.reshape(1).expand(batch), 0.0
    if isinstance(eps_f, torch.Tensor):
        eps_t, eps_f = eps_f.reshape(1).expand(batch), 0.0
    return torch.ops.fastabsld.pgd_step(x_adv, x, grad, alpha_t, eps_t, alpha_f, eps_f, norm, lo, hi)
