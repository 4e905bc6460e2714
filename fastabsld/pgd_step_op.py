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


NORMS = ("linf", "l2")


def _check_per_sample_values(value, name):
    """Raises ValueError for a negative or NaN entry of a CPU per-sample tensor (no host sync)."""
    if value is not None and value.device.type == "cpu" and not bool((value >= 0).all()):
        raise ValueError(f"pgd_step: {name} must be non-negative and not NaN, got {value.tolist()}")


def _reference_kernel(x_adv, x, grad, alpha_per_sample, eps_per_sample, alpha, eps, norm, clamp_min, clamp_max):
    _check_per_sample_values(alpha_per_sample, "alpha")
    _check_per_sample_values(eps_per_sample, "eps")
    a = alpha if alpha_per_sample is None else alpha_per_sample
    e = eps if eps_per_sample is None else eps_per_sample
    with torch.no_grad():
        out = reference.pgd_step(x_adv, x, grad, a, e, norm, (clamp_min, clamp_max))
    return out.contiguous(memory_format=reference.memory_format_of(x_adv))


def _not_differentiable(*args):
    """Autograd kernel: the step (sign, projection) is not differentiable; its output never requires grad."""
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.fastabsld.pgd_step.default(*args)


if not HAS_EXTENSION:
    # The C++ extension registers the same kernels (csrc/pgd_step_*.cpp).
    _LIB = torch.library.Library("fastabsld", "DEF")
    _LIB.define(SCHEMA)
    _LIB.impl("pgd_step", _reference_kernel, "CompositeExplicitAutograd")
    _LIB.impl("pgd_step", _not_differentiable, "Autograd")


@torch.library.register_fake("fastabsld::pgd_step")
def _pgd_step_fake(x_adv, x, grad, alpha_per_sample, eps_per_sample, alpha, eps, norm, clamp_min, clamp_max):
    return torch.empty_like(x_adv, memory_format=reference.memory_format_of(x_adv))


def _check_radius(value, name, batch, device=None):
    """Splits alpha or eps into (per-sample tensor or None, number), checking what needs no sync.

    Per-sample values are checked by the CPU kernels; on CUDA that would need a host sync.
    A 0-d tensor counts as a number: it moves to ``device`` (the inputs'), where one is given.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value.to(device or value.device).reshape(1).expand(batch), 0.0
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(
                f"pgd_step: {name} must be a number or a tensor of shape ({batch},), got shape {tuple(value.shape)}"
            )
        return value, 0.0
    if not isinstance(value, numbers.Real) or math.isnan(value) or value < 0:
        raise ValueError(f"pgd_step: {name} must be a non-negative number, got {value!r}")
    return None, float(value)


def check_step_arguments(alpha, eps, clamp, batch, device=None):
    """Checks alpha, eps and clamp of a step on ``batch`` samples (per-sample values: see ``_check_radius``).

    Args:
        alpha: step size: a non-negative number or a tensor of shape (B,).
        eps: radius: a non-negative number or a tensor of shape (B,).
        clamp: (min, max) with min <= max.
        batch: B.
        device: the inputs' device, where 0-d tensor radii go; None leaves them where they are.

    Returns:
        tuple: (alpha tensor or None, alpha number, eps tensor or None, eps number, clamp min, clamp max).
    """
    try:
        lo, hi = (float(bound) for bound in clamp)
    except (TypeError, ValueError):
        raise ValueError(f"pgd_step: clamp must be a (min, max) pair of numbers, got {clamp!r}") from None
    if not lo <= hi:
        raise ValueError(f"pgd_step: clamp must be (min, max) with min <= max, got {clamp!r}")
    return (*_check_radius(alpha, "alpha", batch, device), *_check_radius(eps, "eps", batch, device), lo, hi)


def pgd_step(x_adv, x, grad, *, alpha, eps, norm="linf", clamp=(0.0, 1.0)):
    """Takes one PGD ascent step and projects it, per sample, in one pass.

    L-inf: ``clamp(x + clamp(x_adv + alpha * sign(grad) - x, -eps, eps), *clamp)``, sign(0) = 0.
    L2 (torchattacks' PGDL2): ``delta = x_adv + alpha * grad / (||grad|| + 1e-10) - x``, then
    ``delta *= min(1, eps / ||delta||)`` (unchanged where delta = 0), then
    ``clamp(x + delta, *clamp)``; norms per sample over all non-batch dimensions, without
    overflow and from delta itself (no cancellation when the step nearly undoes x_adv - x).
    Computed in fp64 for fp64 inputs, else in fp32. The step is not differentiable: the output
    never requires grad. Per-sample values of CUDA tensors are not checked (that would need a
    sync). Every tensor argument must be on ``x_adv``'s device (a 0-d tensor radius moves there).

    Args:
        x_adv: current adversarial inputs, shape (B, ...), fp32/fp64/fp16/bf16, any layout.
        x: clean inputs, same shape (converted to ``x_adv``'s dtype).
        grad: gradient of the loss to maximise at ``x_adv``, same shape.
        alpha: step size: a non-negative number or a tensor of shape (B,).
        eps: radius: a non-negative number or a tensor of shape (B,).
        norm: ``"linf"`` or ``"l2"``.
        clamp: (min, max) of the valid input range.

    Returns:
        Tensor: the new adversarial inputs in ``x_adv``'s dtype, channels_last where ``x_adv`` is
        (a new tensor; the inputs are not modified).
    """
    if norm not in NORMS:
        raise ValueError(f"pgd_step: norm must be 'linf' or 'l2', got {norm!r}")
    if x_adv.dim() == 0 or x.shape != x_adv.shape or grad.shape != x_adv.shape:
        raise ValueError(
            f"pgd_step: x_adv {tuple(x_adv.shape)}, x {tuple(x.shape)} and grad {tuple(grad.shape)} must have the same shape"
        )
    batch = x_adv.shape[0]
    alpha_t, alpha_f, eps_t, eps_f, lo, hi = check_step_arguments(alpha, eps, clamp, batch, x_adv.device)
    return torch.ops.fastabsld.pgd_step.default(x_adv, x, grad, alpha_t, eps_t, alpha_f, eps_f, norm, lo, hi)
