"""An eval-mode view of a network with every ``Conv2d -> BatchNorm2d`` pair folded into one convolution.

In eval mode a BatchNorm is an affine map per channel, so ``bn(conv(x))`` equals a convolution with
weight ``w * s`` and bias ``(b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``. The inner PGD
attack runs the student in eval mode ten times per batch with fixed weights: folding once per batch
removes every BatchNorm forward and backward from those passes (on the CPU the BatchNorm backward
of a channels_last activation costs as much as the convolution's).

The view shares all parameters and leaf modules with the model; only the containers on the way to a
folded pair are shallow copies. Pairs are found inside ``nn.Sequential`` containers (as built by
``fastabsld.recipe.models``); anything else (pre-activation blocks, attribute-wired BatchNorms) runs as is.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn


class FoldedConv2d(nn.Module):
    """``bn(conv(x))`` in eval mode as one convolution with folded weights (refreshed by :meth:`refresh`).

    Args:
        conv: the Conv2d (shared, not copied).
        bn: the BatchNorm2d that follows it, with running statistics.
        channels_last: keep the folded weight in channels_last.
    """

    def __init__(self, conv, bn, channels_last=False):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        # Non-persistent buffers: .to() moves them with the view; the model's state_dict is untouched.
        self.register_buffer("weight", torch.empty_like(conv.weight, requires_grad=False,
                                                        memory_format=self.memory_format), persistent=False)
        self.register_buffer("bias", torch.empty(conv.out_channels, device=conv.weight.device,
                                                 dtype=conv.weight.dtype), persistent=False)
        self.refresh()

    @torch.no_grad()
    def refresh(self):
        """Recomputes the folded weight and bias in place from the current conv and BatchNorm state."""
        conv, bn = self.conv, self.bn
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        if self.weight.shape != conv.weight.shape or self.weight.device != conv.weight.device:
            self.weight = torch.empty_like(conv.weight, requires_grad=False, memory_format=self.memory_format)
            self.bias = torch.empty_like(shift)
        self.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        self.bias.copy_(shift)

    def forward(self, x):
        conv = self.conv
        if conv.padding_mode != "zeros":
            raise ValueError(f"FoldedConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        return F.conv2d(x, self.weight, self.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _foldable(conv, bn):
    return (type(conv) is nn.Conv2d and type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm) and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features and conv.padding_mode == "zeros")


def _view(module, folded, channels_last=False):
    """The folded view of ``module`` (``module`` itself when nothing below it changes)."""
    children = list(module.named_children())
    views = {name: _view(child, folded, channels_last) for name, child in children}
    merged = []
    if isinstance(module, nn.Sequential):
        items = [views[name] for name, _ in children]
        i = 0
        while i < len(items):
            if i + 1 < len(items) and _foldable(items[i], items[i + 1]):
                merged.append(FoldedConv2d(items[i], items[i + 1], channels_last))
                folded.append(merged[-1])
                i += 2
            else:
                merged.append(items[i])
                i += 1
        if len(merged) != len(items) or any(views[n] is not c for n, c in children):
            return nn.Sequential(*merged)
        return module
    if all(views[name] is child for name, child in children):
        return module
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._modules.update(views)
    return new


class FoldedEvalView(nn.Module):
    """Eval-mode view of ``model`` with its ``Conv2d -> BatchNorm2d`` pairs folded (see the module docstring).

    Call :meth:`refresh` whenever the model's weights or BatchNorm statistics have changed (the recipe
    calls it once per batch, before the attack) and run the model in eval mode (the view computes what
    the model computes in eval mode). No gradients flow into the folded weights: use the view for
    input gradients (attacks), not for training.

    Args:
        model: the network (not modified).
        channels_last: run the view in channels_last (folded weights and 4-D inputs) while the model's
            own weights keep their layout: on the CPU, the wider convolutions of a teacher run faster so.
    """

    def __init__(self, model, channels_last=False):
        super().__init__()
        self.folded = []
        self.channels_last = channels_last
        self.net = _view(model, self.folded, channels_last=channels_last)
        self.model = [model]  # not a submodule: state_dict and .train() stay the model's own

    @property
    def changed(self):
        """Whether the view computes differently from the model (something was folded)."""
        return self.net is not self.model[0]

    def refresh(self):
        """Recomputes every folded weight from the model's current state (no host sync)."""
        for layer in self.folded:
            layer.refresh()
        return self

    def forward(self, x):
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)
