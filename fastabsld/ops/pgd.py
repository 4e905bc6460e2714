"""The fused PGD projection step: the op ``torch.ops.fastabsld.pgd_step`` and its public function.

L-inf: ``clamp(x + clamp(x_adv + alpha * sign(grad) - x, -eps, eps), *clamp)``, sign(0) = 0.
L2 (torchattacks' PGDL2): ``delta = x_adv + alpha * grad / (||grad|| + 1e-10) - x``, then
``delta *= min(1, eps / ||delta||)`` (unchanged where delta = 0), then ``clamp(x + delta, *clamp)``;
norms per sample over all non-batch dimensions. alpha and eps are numbers, or (B,) fp32 tensors
that replace them per sample.

The schema is defined in C++ (``csrc/library.cpp``) with CPU and CUDA kernels and an autograd
kernel under which asking for the step's derivative raises. Without the extension, the same schema is defined
here on the plain PyTorch fallback below, so the op, its fake kernel and ``torch.compile`` behave
the same either way.

This module reads top to bottom: the schema, the fallback kernel, the registrations, the
argument checks and the public function.
"""

import math

import torch

from fastabsld.ops._extension import HAS_EXTENSION
from fastabsld.ops.checks import check_choice, compute_dtype, is_number

SCHEMA = (
    "pgd_step(Tensor x_adv, Tensor x, Tensor grad, Tensor? alpha_per_sample, "
    "Tensor? eps_per_sample, float alpha, float eps, str norm, float clamp_min, "
    "float clamp_max) -> Tensor"
)
NORMS = ("linf", "l2")


def memory_format_of(tensor):
    """The memory format that ``tensor`` is dense in: channels_last(_3d) or contiguous.

    The output of the step keeps it (the C++ kernels make the same choice).

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


# ----------------------------------------------------------------------------------------------
# The fallback kernel (plain PyTorch).


def _check_per_sample_values(value, name):
    """Raises ValueError for a negative or NaN entry of a CPU per-sample tensor (no host sync on GPUs)."""
    if value is not None and value.device.type == "cpu" and not bool((value >= 0).all()):
        raise ValueError(f"pgd_step: {name} must be non-negative and not NaN, got {value.tolist()}")


def _per_sample(tensor, number, like):
    """A (B, 1, ..., 1) tensor of per-sample values, or the number, for broadcasting against ``like``."""
    if tensor is None:
        return number
    return tensor.to(like.device, like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def _sample_norms(values):
    """Per-sample L2 norms over all non-batch dimensions, (B, 1, ..., 1), scaled by the largest element
    first so that squaring cannot overflow."""
    flat = values.reshape(values.shape[0], math.prod(values.shape[1:]))  # B = 0 and 1-D inputs too
    scale = flat.abs().amax(dim=1, keepdim=True) if flat.shape[1] else flat.new_ones(flat.shape[0], 1)
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    norms = scale * torch.linalg.vector_norm(flat / scale, dim=1, keepdim=True)
    return norms.reshape((-1,) + (1,) * (values.dim() - 1))


def fallback_step(x_adv, x, grad, alpha_per_sample, eps_per_sample, alpha, eps, norm, clamp_min, clamp_max):
    """The op in plain PyTorch: the backend where no compiled kernel applies.

    Args and Returns: as ``torch.ops.fastabsld.pgd_step`` (see :func:`pgd_step`).
    """
    _check_per_sample_values(alpha_per_sample, "alpha")
    _check_per_sample_values(eps_per_sample, "eps")
    compute = compute_dtype(x_adv)
    with torch.no_grad():
        xa, x0, g = (t.to(compute) for t in (x_adv, x, grad))
        a = _per_sample(alpha_per_sample, alpha, xa)
        e = _per_sample(eps_per_sample, eps, xa)
        if norm == "linf":
            delta = torch.clamp(xa + a * torch.sign(g) - x0, -e, e)
        else:
            g_norm = _sample_norms(g)
            scale = torch.where(g_norm > 1, g_norm, torch.ones_like(g_norm))  # g / (||g|| + 1e-10) without inf / inf
            delta = xa + a * (g / scale) / (g_norm / scale + 1e-10 / scale) - x0
            d_norm = _sample_norms(delta)
            factor = torch.where(d_norm > 0, e / d_norm, torch.ones_like(d_norm)).clamp(max=1.0)
            delta = delta * factor
        out = torch.clamp(x0 + delta, clamp_min, clamp_max).to(x_adv.dtype)
    return out.contiguous(memory_format=memory_format_of(x_adv))


# ----------------------------------------------------------------------------------------------
# Registrations: the schema and kernels (when the extension is missing) and the fake kernel.


NO_DERIVATIVE = (
    "fastabsld::pgd_step has no derivative (its sign step, projection and clamp are not "
    "differentiated); take the gradient of the attack loss at x_adv and pass the inputs detached"
)


class _NoDerivative(torch.autograd.Function):
    """Carries the step's output into a graph whose backward raises (asking for a derivative of the step)."""

    @staticmethod
    def forward(ctx, out, *inputs):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(NO_DERIVATIVE)


def _no_derivative(*args):
    """Autograd kernel: the step has no derivative, and asking for one is an error, never zeros.

    With grad mode on and an input requiring grad, the output's backward raises; an input with a
    forward-mode tangent raises at once (the C++ kernel of the extension does the same).
    """
    tensors = [t for t in args[:5] if isinstance(t, torch.Tensor)]
    if any(torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(NO_DERIVATIVE + " (forward mode)")
    with torch._C._AutoDispatchBelowAutograd():
        out = torch.ops.fastabsld.pgd_step.default(*args)
    differentiable = [t for t in tensors if t.requires_grad]
    if torch.is_grad_enabled() and differentiable:
        return _NoDerivative.apply(out, *differentiable)
    return out


if not HAS_EXTENSION:
    _LIB = torch.library.Library("fastabsld", "DEF")
    _LIB.define(SCHEMA)
    _LIB.impl("pgd_step", fallback_step, "CompositeExplicitAutograd")
    _LIB.impl("pgd_step", _no_derivative, "Autograd")


@torch.library.register_fake("fastabsld::pgd_step")
def _pgd_step_fake(x_adv, x, grad, alpha_per_sample, eps_per_sample, alpha, eps, norm, clamp_min, clamp_max):
    return torch.empty_like(x_adv, memory_format=memory_format_of(x_adv))


# ----------------------------------------------------------------------------------------------
# Argument checks and the public function.


def _check_radius(value, name, batch, device=None):
    """Splits alpha or eps into (per-sample tensor or None, number), checking what needs no sync.

    Per-sample values are checked by the CPU kernels; on CUDA that would need a host sync.
    A 0-d CPU tensor is read as a Python number (a read of host memory: no copy to the inputs'
    device on every call, nothing a CUDA graph could not capture); a 0-d tensor elsewhere stays
    where it is, as a per-sample tensor, moved to ``device`` (the inputs') where one is given.
    """
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:  # bool and integer radii are mistakes, not step sizes
            raise ValueError(f"pgd_step: {name} must be a number or a floating-point tensor, got {value.dtype}")
        if value.dim() == 0:
            if value.device.type == "cpu":
                value = float(value)
            else:
                return value.to(device or value.device).reshape(1).expand(batch), 0.0
        elif value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(
                f"pgd_step: {name} must be a number or a tensor of shape ({batch},), got shape {tuple(value.shape)}"
            )
        else:
            return value, 0.0
    # +inf is allowed (no projection, or a step that leaves the ball); NaN and negatives are not.
    if not is_number(value) or math.isnan(value) or value < 0:
        raise ValueError(f"pgd_step: {name} must be a non-negative number, got {value!r}")
    return None, float(value)


def check_step_arguments(alpha, eps, clamp, batch, device=None):
    """Checks alpha, eps and clamp of a step on ``batch`` samples (per-sample values: see ``_check_radius``).

    Args:
        alpha: step size: a non-negative number or a tensor of shape (B,).
        eps: radius: a non-negative number or a tensor of shape (B,).
        clamp: (min, max) with min <= max.
        batch: B.
        device: the inputs' device, where 0-d tensor radii not on the CPU go; None leaves them
            where they are (0-d CPU tensors become numbers).

    Returns:
        tuple: (alpha tensor or None, alpha number, eps tensor or None, eps number, clamp min, clamp max).
    """
    try:
        lo, hi = clamp
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"pgd_step: clamp must be a (min, max) pair of numbers, got {clamp!r}") from None
    if not lo <= hi:
        raise ValueError(f"pgd_step: clamp must be (min, max) with min <= max, got {clamp!r}")
    return (*_check_radius(alpha, "alpha", batch, device), *_check_radius(eps, "eps", batch, device), lo, hi)


def pgd_step(x_adv, x, grad, *, alpha, eps, norm="linf", clamp=(0.0, 1.0)):
    """Takes one PGD ascent step and projects it, per sample, in one pass.

    L-inf and L2 as in the module docstring; the L2 norms are taken without overflow and from delta
    itself (no cancellation when the step nearly undoes x_adv - x). Computed in fp64 for fp64
    inputs, else in fp32. The step has no derivative: where an input requires grad, a backward
    through the output raises (as does forward mode), never giving zeros; attacks pass detached
    inputs.
    Per-sample values of CUDA tensors are not checked (that would need a sync). Every tensor
    argument must be on ``x_adv``'s device, except a 0-d tensor radius: on the CPU it is read as
    a number (no copy to the device on each call), on another device it moves to ``x_adv``'s.

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
    check_choice(norm, "pgd_step: norm", NORMS)
    if x_adv.dim() == 0 or x.shape != x_adv.shape or grad.shape != x_adv.shape:
        raise ValueError(
            f"pgd_step: x_adv {tuple(x_adv.shape)}, x {tuple(x.shape)} and grad {tuple(grad.shape)} must have the same shape"
        )
    device = x_adv.device
    # The usual call (tensors on one device, number radii) costs two comparisons here.
    if x.device != device or grad.device != device or isinstance(alpha, torch.Tensor) or isinstance(eps, torch.Tensor):
        for name, tensor in (("x", x), ("grad", grad), ("alpha", alpha), ("eps", eps)):
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.device != device:
                raise ValueError(f"pgd_step: {name} is on {tensor.device}, x_adv on {device}: "
                                 "every tensor argument must be on one device")
    alpha_t, alpha_f, eps_t, eps_f, lo, hi = check_step_arguments(alpha, eps, clamp, x_adv.shape[0], device)
    return torch.ops.fastabsld.pgd_step.default(x_adv, x, grad, alpha_t, eps_t, alpha_f, eps_f, norm, lo, hi)
