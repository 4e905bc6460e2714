"""The speed options of the training step: bf16 autocast, channels_last, torch.compile, BatchNorm folding.

Helpers the steps (``fastabsld.recipe.steps``) and the loop (``fastabsld.recipe.loop``) call; they
hold no state of their own.
"""

import contextlib

import torch
from torch import nn

from fastabsld.recipe.fold import FoldedEvalView


def autocast(enabled, device_type):
    """bf16 autocast on ``device_type`` when ``enabled``, else a no-op context.

    Args:
        enabled: whether to autocast.
        device_type: ``"cpu"`` or ``"cuda"``.

    Returns:
        context manager.
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def forward_fp32(model, x, amp):
    """``model(x)`` (under bf16 autocast when ``amp``) as fp32 logits, so that every loss is computed in fp32.

    Args:
        model: the network.
        x: its input batch.
        amp: autocast the forward to bf16.

    Returns:
        Tensor: the logits in fp32 (or in the model's dtype when it is wider, e.g. fp64).
    """
    with autocast(amp, x.device.type):
        logits = model(x)
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


class Fp32Logits(nn.Module):
    """A model whose forward is :func:`forward_fp32` (the attack's view of the student under ``--amp``).

    Args:
        model: the network.
        amp: autocast the forward to bf16.
    """

    def __init__(self, model, amp):
        super().__init__()
        self.model, self.amp = model, amp

    def forward(self, x):
        return forward_fp32(self.model, x, self.amp)


def to_device(x, device, channels_last):
    """Moves an input batch to ``device`` (asynchronously), in channels_last when asked and 4-D.

    Args:
        x: the batch.
        device: target device.
        channels_last: give a 4-D batch the channels_last memory format.

    Returns:
        Tensor: the batch on ``device``.
    """
    memory_format = torch.channels_last if channels_last and x.dim() == 4 else torch.preserve_format
    return x.to(device, non_blocking=True, memory_format=memory_format)


def _on_cpu(model):
    return all(p.device.type == "cpu" for p in model.parameters())


def step_models(student, cfg, *, distill=True, teacher=None, train_model=None):
    """The student as the training step calls it, the folded view the attack runs on, and the teacher's.

    Args:
        student: the network being trained (its parameters are what the optimiser updates).
        cfg: TrainConfig (``compile``, ``fold_bn``).
        distill: whether the step is a distillation step (the folded attack view is only used there).
        teacher: the frozen teacher (eval mode), or None.
        train_model: what the training passes call (e.g. the DistributedDataParallel wrapper of
            ``student``; default: ``student``).

    Returns:
        tuple: (what the training passes call: ``torch.compile(train_model)`` under ``cfg.compile``,
        else ``train_model``; a :class:`FoldedEvalView` of the student (in channels_last on
        the CPU), its network compiled under ``cfg.compile``, or None when ``cfg.fold_bn`` is off, the view would
        change nothing, or the step is PGD-AT; the teacher's folded view (refreshed once: the teacher is
        frozen; in channels_last on the CPU), or ``teacher`` itself).
    """
    # On the CPU the folded views run in channels_last whatever the models' layout (measured faster there).
    view = FoldedEvalView(student, channels_last=_on_cpu(student)) if cfg.fold_bn and distill else None
    if view is not None and not view.changed:
        view = None
    if teacher is not None and cfg.fold_bn:
        teacher_view = FoldedEvalView(teacher, channels_last=_on_cpu(teacher))
        teacher = teacher_view.refresh() if teacher_view.changed else teacher
    train_model = student if train_model is None else train_model
    if cfg.compile:
        train_model = torch.compile(train_model)
        if view is not None:
            view.net = torch.compile(view.net)
    return train_model, view, teacher
