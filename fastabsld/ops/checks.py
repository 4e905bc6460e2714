"""The argument checks shared by the public functions: numbers, choices, label tensors, compute dtypes.

Each public function validates its arguments once, with these helpers, and names the argument in
the error; the layers below trust their callers.
"""

import math
import numbers

import torch


def is_number(value):
    """Whether ``value`` is a real number in the Python sense (int, float, numpy scalar), not a bool or tensor.

    Args:
        value: anything.

    Returns:
        bool: True for real numbers other than bools.
    """
    if type(value) is float or type(value) is int:  # the common case, without the ABC check
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, torch.Tensor))


def check_real(value, name, *, minimum=None, strict=False, maximum=None):
    """A finite real number (not a bool) within the given bounds, as a Python float.

    Args:
        value: the argument.
        name: its name, for the error message.
        minimum: lower bound, or None.
        strict: the lower bound is exclusive (``value > minimum``).
        maximum: inclusive upper bound, or None.

    Returns:
        float: ``value``.

    Raises:
        ValueError: not a real number, not finite (huge integers included), or out of bounds; the
            message names the argument and what it must be.
    """
    if minimum == 0 and maximum is None:
        wanted = "positive and finite" if strict else "non-negative and finite"
    else:
        bounds = [f"{'>' if strict else '>='} {minimum}"] if minimum is not None else []
        bounds += [f"<= {maximum}"] if maximum is not None else []
        wanted = " and ".join(["finite"] + bounds)
    if not is_number(value):
        raise ValueError(f"{name} must be a number ({wanted}), got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    below = minimum is not None and (number <= minimum if strict else number < minimum)
    if not math.isfinite(number) or below or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {wanted}, got {short_repr(value)}")
    return number


def short_repr(value, limit=40):
    """``repr(value)``, shortened in the middle when longer than ``limit`` (a 400-digit integer).

    Args:
        value: anything.
        limit: the longest repr kept whole.

    Returns:
        str: the repr.
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-8:]} ({len(text)} characters)"


def check_int(value, name, *, minimum=None):
    """An integer (not a bool) of at least ``minimum``, as a Python int.

    Args:
        value: the argument.
        name: its name, for the error message.
        minimum: lower bound, or None.

    Returns:
        int: ``value``.

    Raises:
        ValueError: not an integer, or below ``minimum``.
    """
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_choice(value, name, choices):
    """One of ``choices``.

    Args:
        value: the argument.
        name: its name, for the error message.
        choices: the allowed values.

    Returns:
        ``value``.

    Raises:
        ValueError: ``value`` is not among ``choices``.
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def is_integer_tensor(tensor):
    """Whether ``tensor`` is a tensor of an integer dtype (not bool, floating or complex).

    Args:
        tensor: anything.

    Returns:
        bool: True for integer tensors.
    """
    return isinstance(tensor, torch.Tensor) and not (tensor.dtype.is_floating_point or tensor.dtype.is_complex
                                                      or tensor.dtype == torch.bool)


def describe(value):
    """A short description of an argument for error messages: a tensor's dtype and shape, else its type.

    Args:
        value: anything.

    Returns:
        str: e.g. ``"a torch.float32 tensor of shape (4, 3)"`` or ``"list"``.
    """
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def check_label_range(labels, num_classes, name="labels"):
    """Raises unless every label lies in [0, num_classes); checked on CPU tensors only (no host sync on GPUs).

    Args:
        labels: integer tensor.
        num_classes: C.
        name: the argument's name, for the error message.

    Raises:
        ValueError: a CPU label outside [0, C), with the range found.
    """
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling() and \
            bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values from {int(labels.min())} to "
                         f"{int(labels.max())}")


def compute_dtype(*tensors):
    """The dtype fastabsld computes in for these inputs: fp64 when any is fp64, else fp32.

    Args:
        *tensors: the inputs.

    Returns:
        torch.dtype: torch.float64 or torch.float32.
    """
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
