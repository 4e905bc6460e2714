"""Class-wise teacher temperatures of ABSLD: argument checks, risk accumulation and the
anti-bias update.

Everything here stays on the tensors' device: no ``.item()``, no branching on tensor values.
"""

import torch

from fastabsld.ops.checks import check_real, compute_dtype


def check_temperature_bounds(tau_min, tau_max, tau_init=None):
    """Raises ValueError unless ``0 < tau_min <= tau_init <= tau_max`` (all finite).

    Args:
        tau_min: lower clamp of the temperatures.
        tau_max: upper clamp of the temperatures.
        tau_init: the initial temperature, or None to check only the bounds.
    """
    values = {"tau_min": tau_min, "tau_max": tau_max}
    if tau_init is not None:
        values["tau_init"] = tau_init
    for name, value in values.items():
        check_real(value, name)
    if not 0 < tau_min <= tau_max:
        raise ValueError(f"need 0 < tau_min <= tau_max, got tau_min={tau_min}, tau_max={tau_max}")
    if tau_init is not None and not tau_min <= tau_init <= tau_max:
        raise ValueError(f"need tau_min <= tau_init <= tau_max, got {tau_min} <= {tau_init} <= {tau_max}")


def check_beta(beta):
    """Raises ValueError unless ``beta`` is a finite non-negative number.

    Args:
        beta: the step size of the anti-bias update.
    """
    check_real(beta, "beta", minimum=0.0)


def anti_bias_update(tau, risk, beta, tau_min=0.5, tau_max=5.0):
    """One anti-bias step of the class temperatures: ``clip(tau - beta * g / max|g|, tau_min, tau_max)``
    with ``g = risk - mean(risk)``.

    A class with above-average risk gets a lower temperature (sharper teacher labels). When all
    classes tie (``max|g| == 0``, where the released code divides by zero and produces NaN) or the
    risk is not finite, ``tau`` is returned unchanged. No host synchronisation.

    Args:
        tau: (C,) current temperatures.
        risk: (C,) per-class error risk accumulated over the epoch.
        beta: step size, a number or a 0-d tensor.
        tau_min: lower clamp.
        tau_max: upper clamp.

    Returns:
        Tensor: (C,) new temperatures, in ``tau``'s dtype and device (a new tensor).
    """
    check_temperature_bounds(tau_min, tau_max)
    if tau.dim() != 1 or risk.shape != tau.shape:
        raise ValueError(f"tau and risk must both have shape (C,), got {tuple(tau.shape)} and {tuple(risk.shape)}")
    compute = compute_dtype(tau)
    risk = risk.to(tau.device, compute)
    gap = risk - risk.mean()
    scale = gap.abs().amax()
    moves = scale > 0
    step = gap / torch.where(moves, scale, torch.ones_like(scale))
    updated = torch.clamp(tau.to(compute) - beta * step, tau_min, tau_max)
    return torch.where(moves, updated, tau.to(compute)).to(tau.dtype)


def accumulate_class_risk(risk, logits, labels):
    """Adds each sample's cross-entropy against its hard label to its class's entry of ``risk``.

    In place, detached, without host synchronisation.

    Args:
        risk: (C,) floating accumulator, updated in place.
        logits: (B, C) logits.
        labels: (B,) integer labels in [0, C).

    Returns:
        Tensor: ``risk``.

    Raises:
        ValueError: ``risk`` is not an fp32 or fp64 tensor (a 16-bit sum stops growing within an epoch).
    """
    if not isinstance(risk, torch.Tensor) or risk.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"risk must be an fp32 or fp64 tensor (a 16-bit sum saturates within an epoch), got "
                         f"{risk.dtype if isinstance(risk, torch.Tensor) else type(risk).__name__}")
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(logits.detach().float(), labels, reduction="none")
        return risk.index_add_(0, labels, losses.to(risk.dtype))
