"""Models of the recipe: small CNNs for 8x8 digits and the standard CIFAR networks, or your own.

All models take inputs in [0, 1] without normalisation (as in the ABSLD recipe) and return logits.
Names for :func:`build_model`: ``cnn-s`` (digits student), ``cnn-l`` (digits teacher),
``resnet18``, ``mobilenetv2``, ``wrn-34-10``, or ``pkg.module:factory`` for a model of your own: the
factory is imported and called with ``num_classes`` and ``in_channels`` (each passed only when
the factory takes it, so ``torchvision.models:resnet18`` works too) and must return an
``nn.Module`` mapping (B, C, H, W) images in [0, 1] to (B, num_classes) logits.
"""

import importlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(in_ch, out_ch, stride=1, groups=1, kernel=3, act=nn.ReLU):
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(out_ch)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """A VGG-style CNN for small images: two conv blocks (each two convs, max-pool) and a linear head.

    Args:
        num_classes: number of outputs.
        in_channels: input channels.
        width: channels of the first block (the second has twice as many).
    """

    def __init__(self, num_classes=10, in_channels=1, width=16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w), _conv_bn(w, w), nn.MaxPool2d(2),
            _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, in_ch, out_ch, stride):
        super().__init__()
        self.conv1 = _conv_bn(in_ch, out_ch, stride)
        self.conv2 = _conv_bn(out_ch, out_ch, act=None)
        self.shortcut = nn.Identity() if stride == 1 and in_ch == out_ch else _conv_bn(in_ch, out_ch, stride, kernel=1,
                                                                                        act=None)

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 (3x3 stem, no max-pool, stages of 64/128/256/512 channels, two basic blocks each).

    Args:
        num_classes: number of outputs.
        in_channels: input channels.
    """

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = _conv_bn(in_channels, 64)
        blocks, ch = [], 64
        for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(ch, out_ch, stride), _BasicBlock(out_ch, out_ch, 1)]
            ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _InvertedResidual(nn.Module):
    def __init__(self, in_ch, out_ch, stride, expand):
        super().__init__()
        hidden = in_ch * expand
        layers = [] if expand == 1 else [_conv_bn(in_ch, hidden, kernel=1, act=nn.ReLU6)]
        layers += [_conv_bn(hidden, hidden, stride, groups=hidden, act=nn.ReLU6),
                   _conv_bn(hidden, out_ch, kernel=1, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x):
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (stride 1 in the stem and the first stride-2 stage, as usual for CIFAR).

    Args:
        num_classes: number of outputs.
        in_channels: input channels.
    """

    # (expansion, out channels, repeats, stride) per stage
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        layers, ch = [_conv_bn(in_channels, 32, act=nn.ReLU6)], 32
        for expand, out_ch, repeats, stride in self.STAGES:
            for i in range(repeats):
                layers.append(_InvertedResidual(ch, out_ch, stride if i == 0 else 1, expand))
                ch = out_ch
        layers.append(_conv_bn(ch, 1280, kernel=1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(1280, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class _WideBlock(nn.Module):
    """Pre-activation wide residual block (BN-ReLU-conv twice).

    The shortcut is the identity when the shape is kept, else a 1x1 convolution of the pre-activated
    input: the same function as the TRADES/RobustBench ``BasicBlock`` (whose ``equalInOut`` branch
    adds the raw input, and whose other branch feeds ``relu(bn1(x))`` to both the residual and
    ``convShortcut``), so their weights convert one to one (``fastabsld.recipe.teachers``).
    """

    def __init__(self, in_ch, out_ch, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(in_ch), nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(out_ch), nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = None if in_ch == out_ch and stride == 1 else nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """Wide ResNet WRN-depth-width (pre-activation; WRN-34-10 is the usual robust CIFAR teacher).

    Computes the function of the TRADES / RobustBench WideResNet (``Zhang2019Theoretically``) for the
    same weights; on 32x32 inputs the global average pooling equals their ``avg_pool2d(out, 8)``.

    Args:
        num_classes: number of outputs.
        in_channels: input channels.
        depth: 6n + 4 layers.
        width: widening factor.
    """

    def __init__(self, num_classes=10, in_channels=3, depth=34, width=10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * width, 32 * width, 64 * width)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, ch = [], widths[0]
        for out_ch, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(_WideBlock(ch, out_ch, stride if i == 0 else 1))
                ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(ch)
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MODELS = {
    "cnn-s": lambda c, i: SmallCNN(c, i, width=16),
    "cnn-l": lambda c, i: SmallCNN(c, i, width=32),
    "resnet18": ResNet18,
    "mobilenetv2": MobileNetV2,
    "wrn-34-10": lambda c, i: WideResNet(c, i, 34, 10),
}


def is_factory(name):
    """Whether a model name is a ``pkg.module:factory`` reference rather than a registered name.

    Args:
        name: a model name.

    Returns:
        bool: True for ``module:attribute`` names.
    """
    return isinstance(name, str) and ":" in name


def check_model_name(name, what="model"):
    """Raises ValueError unless ``name`` is a registered model or an importable ``pkg.module:factory``.

    The factory is imported (not called), so that a typo fails before any training.

    Args:
        name: the model name.
        what: the setting's name, for the message.

    Returns:
        callable: the factory.
    """
    if is_factory(name):
        return _factory(name)
    if name not in MODELS:
        raise ValueError(f"{what} must be one of {sorted(MODELS)} or 'pkg.module:factory', got {name!r}")
    return MODELS[name]


def _factory(name):
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"model {name!r}: cannot import {module_name} ({error})") from error
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"model {name!r}: {module_name} has no attribute {attribute!r}")
    if not callable(factory):
        raise ValueError(f"model {name!r}: {attribute} is not callable")
    return factory


def _call_factory(name, num_classes, in_channels):
    factory = _factory(name)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {key: value for key, value in (("num_classes", num_classes), ("in_channels", in_channels))
              if takes_any or key in parameters}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def build_model(name, num_classes, in_channels):
    """Builds a model by name.

    Args:
        name: one of ``MODELS`` (``cnn-s``, ``cnn-l``, ``resnet18``, ``mobilenetv2``, ``wrn-34-10``), or
            ``pkg.module:factory`` (see the module docstring).
        num_classes: number of outputs.
        in_channels: input channels (1 for digits, 3 for CIFAR).

    Returns:
        nn.Module: the freshly initialised model.

    Raises:
        ValueError: an unknown name, or a factory that cannot be imported or returns no module.
    """
    if is_factory(name):
        return _call_factory(name, num_classes, in_channels)
    return check_model_name(name)(num_classes, in_channels)
