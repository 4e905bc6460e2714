"""Adversarial attacks built on the fused step ``fastabsld.ops.pgd_step``: PGD (L-inf, L2), FGSM,
and the attack losses the ABSLD recipe and its evaluation need (CE, KL to soft labels, CW margin).

The attacks take the gradient with respect to the input only (``torch.autograd.grad``), so the
model's parameters never receive gradients. :func:`pgd` and :func:`fgsm` run an ``nn.Module`` in eval
mode by default and give every submodule back the mode it had (as torchattacks does), so an attack on
a model in train mode neither updates its BatchNorm statistics nor draws dropout masks;
``eval_mode=False`` keeps the caller's modes (the recipe's training step, which sets eval mode
itself, passes it). :func:`pgd_loop` never touches modes: it is the loop a CUDA graph captures, and a
mode switch is a host-side side effect a graph cannot replay. Each attack checks its arguments once;
its steps then call the op directly.
"""

import contextlib
import contextvars
import math
import numbers

import torch
import torch.nn.functional as F

from fastabsld.ops.checks import check_choice
from fastabsld.ops.kd_loss import kd_kl_div
from fastabsld.ops.pgd import NORMS, check_step_arguments

RANDOM_STARTS = ("uniform", "normal", "none")


def ce_loss(labels, reduction="sum"):
    """Cross-entropy against hard labels, the loss of the standard PGD attack.

    Args:
        labels: (B,) integer class labels.
        reduction: "sum" (default: each sample's gradient does not depend on the batch size) or
            "mean" (as torchattacks computes it; the attack steps are the same up to rounding).

    Returns:
        callable: ``loss_fn(logits) -> scalar`` to maximise.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")

    def loss_fn(logits):
        return F.cross_entropy(logits, labels, reduction=reduction)

    return loss_fn


def kl_loss(teacher_probs):
    """Sum over the batch of KL(teacher_probs || softmax(logits)): the ABSLD inner loss.

    Runs on the fused KD loss ``fastabsld.loss.kd_kl_div``: the teacher logits are
    ``log(teacher_probs)``, whose softmax is ``teacher_probs`` again; a zero probability becomes a
    class ruled out (logit -inf).

    Args:
        teacher_probs: (B, C) soft labels of the teacher: floating point, entries in [0, 1], rows
            summing to 1 (to within C units in the last place of fp32, or of their dtype where
            it is coarser). Checked on CPU
            tensors (ValueError: logits passed for probabilities would make the loss NaN and the
            attack stand still); on a GPU that check would be a host sync, so it is not made.

    Returns:
        callable: ``loss_fn(logits) -> scalar`` to maximise.
    """
    if teacher_probs.dim() != 2:
        raise ValueError(f"teacher_probs must have shape (B, C), got {tuple(teacher_probs.shape)}")
    _check_probabilities(teacher_probs)
    teacher_logits = torch.log(teacher_probs.detach())

    def loss_fn(logits):
        if logits.shape != teacher_logits.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and teacher_probs {tuple(teacher_logits.shape)} must have the same shape"
            )
        return kd_kl_div(logits, teacher_logits, reduction="sum")

    return loss_fn


def _check_probabilities(probs):
    """Raises ValueError unless the CPU tensor ``probs`` (B, C) holds probability rows (see :func:`kl_loss`)."""
    if not probs.dtype.is_floating_point:
        raise ValueError(f"teacher_probs must be floating point probabilities, got {probs.dtype}")
    if probs.device.type != "cpu" or probs.numel() == 0:
        return
    values = probs.detach()
    if not bool(((values >= 0) & (values <= 1)).all()):
        raise ValueError(
            f"teacher_probs must hold probabilities in [0, 1] (softmax of the teacher's logits, not the logits), "
            f"got values in [{values.min().item():.4g}, {values.max().item():.4g}]")
    sums = values.sum(dim=1, dtype=torch.float64)
    # fp64 soft labels are usually an fp32 softmax widened: fp32's rounding is the finest expected.
    tolerance = values.shape[1] * max(torch.finfo(values.dtype).eps, torch.finfo(torch.float32).eps)
    worst = (sums - 1).abs().max().item()
    if not worst <= tolerance:
        raise ValueError(f"teacher_probs rows must sum to 1, got a row summing to 1 {'+' if sums[(sums - 1).abs().argmax()] > 1 else '-'} "
                         f"{worst:.3g} (tolerance {tolerance:.2g} for {values.shape[1]} {values.dtype} entries; renormalise them)")


def cw_loss(labels, confidence=50.0):
    """The CW-inf margin loss: ``-sum_i max(z_true - max_{k != true} z_k + confidence, 0)``.

    Maximising it pushes the true-class logit below the best other one by ``confidence``.

    Args:
        labels: (B,) integer class labels.
        confidence: the margin kappa (50 in the RSLAD/ABSLD evaluation).

    Returns:
        callable: ``loss_fn(logits) -> scalar`` to maximise.
    """

    def loss_fn(logits):
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(f"logits must have shape (B, C) with C >= 2, got {tuple(logits.shape)}")
        true = logits.gather(1, labels.reshape(-1, 1)).squeeze(1)
        is_true = F.one_hot(labels, logits.shape[1]).bool()
        other = logits.masked_fill(is_true, float("-inf")).amax(dim=1)
        return -torch.clamp(true - other + confidence, min=0).sum()

    return loss_fn


def _per_sample(value, like):
    """A number, or a (B,) tensor reshaped to broadcast against ``like`` (B, ...)."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value.to(like.device, like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))
    return value


# (index, count) while inside ``sharded_draws``: x holds rows index::count of a batch count times larger.
_ROW_SHARD = contextvars.ContextVar("fastabsld_row_shard", default=None)


@contextlib.contextmanager
def sharded_draws(index, count):
    """Random starts drawn for the whole batch, of which the attacked ``x`` holds rows ``index::count``.

    Inside this context every random start is drawn with the shape of the full batch (``count``
    times the rows of ``x``) and only this shard's rows are kept. When all shards use generators in
    the same state (one per process under torch.distributed), their attacks together start from
    exactly the points of one unsharded attack on the full batch, and the generators stay in step.

    Args:
        index: this shard's position (the rank).
        count: number of shards (the world size).
    """
    if not 0 <= index < count:
        raise ValueError(f"index must be in [0, count), got index={index}, count={count}")
    token = _ROW_SHARD.set((index, count) if count > 1 else None)
    try:
        yield
    finally:
        _ROW_SHARD.reset(token)


def _noise(kind, x, generator):
    """Standard normal or U(-1, 1) noise shaped like ``x``, drawn with ``generator`` (see ``sharded_draws``)."""
    device = generator.device if generator is not None else x.device
    shard = _ROW_SHARD.get()
    shape = x.shape if shard is None else (x.shape[0] * shard[1],) + tuple(x.shape[1:])
    if kind == "normal":
        noise = torch.randn(shape, generator=generator, device=device, dtype=x.dtype)
    else:
        noise = torch.rand(shape, generator=generator, device=device, dtype=x.dtype).mul_(2).sub_(1)
    if shard is not None:
        noise = noise[shard[0]::shard[1]]
    return noise.to(x.device)


def _start(x, eps, norm, random_start, clamp, generator):
    """The attack's first point: x, x + 0.001 N(0, 1), or uniform in the eps-ball (in the box)."""
    if random_start == "none":
        return x.clone()
    if random_start == "normal":
        return x + 0.001 * _noise("normal", x, generator)
    radius = _per_sample(eps, x)
    if norm == "linf":
        start = x + radius * _noise("uniform", x, generator)
    else:
        # torchattacks' PGDL2 start: a normal direction scaled to a U(0, 1) fraction of eps.
        direction = _noise("normal", x, generator)
        norms = direction.reshape(x.shape[0], math.prod(x.shape[1:])).norm(dim=1).reshape((-1,) + (1,) * (x.dim() - 1))
        fraction = _noise("uniform", norms, generator).abs()
        start = x + direction * (fraction / norms) * radius
    return start.clamp(clamp[0], clamp[1])


@contextlib.contextmanager
def model_mode(model, eval_mode=True):
    """Runs ``model`` in eval mode inside the context, then gives each submodule back its own mode.

    Args:
        model: an ``nn.Module`` (anything else, e.g. a plain function, is left alone).
        eval_mode: switch to eval mode; ``False`` keeps the caller's modes (a no-op context).

    Yields:
        the model.
    """
    if not eval_mode or not isinstance(model, torch.nn.Module):
        yield model
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def pgd(model, x, loss_fn, *, eps, alpha, steps, norm="linf", random_start="uniform", clamp=(0.0, 1.0),
        generator=None, eval_mode=True):
    """Projected gradient ascent on ``loss_fn(model(x_adv))`` within the eps-ball around ``x``.

    An ``nn.Module`` runs in eval mode (BatchNorm uses its running statistics and is not updated,
    dropout is off) and every submodule is given back its mode afterwards; its parameters receive
    no gradients.

    Args:
        model: callable mapping inputs (B, ...) to logits.
        x: clean inputs (B, ...), floating point, inside ``clamp`` (checked on CPU tensors; on a GPU
            that would be a host sync, so it is not); B may be 0.
        loss_fn: ``loss_fn(logits) -> scalar`` to maximise (see ``ce_loss``, ``kl_loss``,
            ``cw_loss``).
        eps: radius: a non-negative number or a (B,) tensor.
        alpha: step size: a non-negative number or a (B,) tensor.
        steps: number of ascent steps (0 returns the start).
        norm: "linf" (sign steps) or "l2" (normalised-gradient steps).
        random_start: "uniform" (uniformly in the eps-ball, then clamped to the box), "normal"
            (``x + 0.001 * N(0, 1)``, the ABSLD recipe) or "none" (start at ``x``).
        clamp: (min, max) of the valid input range.
        generator: torch.Generator for the random start, or None for the global one.
        eval_mode: run the model in eval mode (default); ``False`` runs it in whatever modes the
            caller left it (a model in train mode then updates its BatchNorm statistics at every step).

    Returns:
        Tensor: the adversarial inputs, detached, shaped like ``x``.

    Raises:
        ValueError: a bad argument, integer ``x``, or (CPU tensors) ``x`` outside ``clamp``.
        RuntimeError: called inside ``torch.inference_mode()``, where no gradient can be taken.
    """
    check_choice(random_start, "random_start", RANDOM_STARTS)
    step = _check_attack(x, eps, alpha, steps, norm, clamp)  # also when steps = 0: the start uses eps and clamp
    x = x.detach()
    with model_mode(model, eval_mode):
        return _ascend(model, x, _start(x, eps, norm, random_start, clamp, generator), loss_fn, int(steps), step)


def pgd_loop(model, x, x_start, loss_fn, *, eps, alpha, steps, norm="linf", clamp=(0.0, 1.0)):
    """The ascent steps of :func:`pgd` from a given start: static shapes, no RNG, no host synchronisation.

    Each step is one forward, one input gradient and one fused ``pgd_step``; nothing depends on tensor
    values on the host, so the loop can be captured in a CUDA graph (draw the start outside the graph,
    or from static noise inside it; see the README's "Training speed" section) or traced by
    ``torch.compile``. The model should be in eval mode with no side effects (e.g. a
    :class:`fastabsld.recipe.fold.FoldedEvalView`).

    Args:
        model: callable mapping inputs (B, ...) to logits.
        x: clean inputs (B, ...), the centre of the eps-ball.
        x_start: the first point (B, ...), e.g. ``x + 0.001 * noise``.
        loss_fn: ``loss_fn(logits) -> scalar`` to maximise.
        eps: radius: a non-negative number or a (B,) tensor.
        alpha: step size: a non-negative number or a (B,) tensor.
        steps: number of ascent steps (a Python int).
        norm: "linf" or "l2".
        clamp: (min, max) of the valid input range.

    Returns:
        Tensor: the adversarial inputs, detached, shaped like ``x``.
    """
    if x_start.shape != x.shape:
        raise ValueError(f"x_start {tuple(x_start.shape)} and x {tuple(x.shape)} must have the same shape")
    step = _check_attack(x, eps, alpha, steps, norm, clamp)
    return _ascend(model, x, x_start, loss_fn, int(steps), step)


def _check_attack(x, eps, alpha, steps, norm, clamp):
    """Checks an attack's arguments once; returns the op's trailing arguments for every step."""
    check_choice(norm, "norm", NORMS)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Real) or steps != steps or steps < 0 \
            or steps == float("inf") or int(steps) != steps:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(f"x must be a batch tensor (B, ...), got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point (images scaled to the clamp range, e.g. x.float() / 255 "
                         f"for [0, 1]), got {x.dtype}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("an attack needs the gradient of its loss and cannot run inside torch.inference_mode(); "
                           "run it outside (under torch.no_grad() if you like: the attack enables gradients itself)")
    alpha_t, alpha_f, eps_t, eps_f, lo, hi = check_step_arguments(alpha, eps, clamp, x.shape[0])
    if x.device.type == "cpu" and x.numel() and not bool(((x >= lo) & (x <= hi)).all()):
        raise ValueError(
            f"x must lie inside clamp=({lo:g}, {hi:g}), got values in [{x.min().item():.4g}, {x.max().item():.4g}]: "
            "the step clamps to that range, which would move such inputs far outside the eps-ball; pass the "
            "range the inputs live in as clamp (e.g. clamp=(-inf, inf) for no clamping)")
    # The step's kernel checks per-sample values, but a 0-step attack (or the random start, which
    # uses eps before any step) never reaches it: check CPU tensors here. On CUDA that would be a
    # host sync per attack, so the kernel's check is the one that applies there.
    for name, radius in (("alpha", alpha_t), ("eps", eps_t)):
        if radius is not None and radius.device.type == "cpu" and not bool((radius >= 0).all()):
            raise ValueError(f"{name} must be non-negative (and not NaN) for every sample, got {radius.tolist()!r:.200}")
    return alpha_t, eps_t, alpha_f, eps_f, norm, lo, hi


def _ascend(model, x, x_start, loss_fn, steps, step):
    """The ascent loop on checked arguments: one forward, one input gradient and one fused step each."""
    x_adv = x_start.detach()
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv))
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = torch.ops.fastabsld.pgd_step.default(x_adv.detach(), x, grad, *step)
    return x_adv.detach()


def fgsm(model, x, loss_fn, *, eps, clamp=(0.0, 1.0), eval_mode=True):
    """The fast gradient sign method: one L-inf step of size eps from ``x`` (the model in eval mode, as in :func:`pgd`).

    Args:
        model: callable mapping inputs (B, ...) to logits.
        x: clean inputs (B, ...).
        loss_fn: ``loss_fn(logits) -> scalar`` to maximise.
        eps: radius and step size: a non-negative number or a (B,) tensor.
        clamp: (min, max) of the valid input range.
        eval_mode: run the model in eval mode (default), or in the caller's modes (``False``).

    Returns:
        Tensor: the adversarial inputs, detached, shaped like ``x``.
    """
    return pgd(model, x, loss_fn, eps=eps, alpha=eps, steps=1, norm="linf", random_start="none", clamp=clamp,
               eval_mode=eval_mode)
