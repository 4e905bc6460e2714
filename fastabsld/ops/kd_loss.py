"""The fused knowledge-distillation loss: the ops ``kd_kl_div_forward`` / ``kd_kl_div_loss`` and ``kd_kl_div``.

Per row i (s, t: the student's and teacher's logits; C columns), with p = softmax(t / tau_t)
and q = softmax(s / tau_s) computed in fp32 (fp64 for fp64 logits), and the row weight
``w_i = weight[labels[i]] * sample_weight[i] * sample_weight_scalar`` (a factor is 1 where its
tensor is None), the op ``torch.ops.fastabsld.kd_kl_div_forward`` returns

* ``row_loss[i] = w_i * sum_c p_c (log p_c - log q_c)`` (0 log 0 = 0), shape (B,), fp32 (fp64);
* ``grad_student[i] = w_i * (q - p) / tau_s`` in the student's dtype, or an empty (0,) tensor;
* ``grad_teacher[i] = w_i * p * ((log p - log q) - KL_i) / tau_t`` in the teacher's dtype, or
  an empty (0,) tensor.

A temperature tensor (fp32, fp64 for fp64 logits) has shape (C,), one value per class indexed
by ``labels`` (it needs labels), or (B, 1), one value per row; the scalar is used where the
tensor is None. ``weight`` (C,) needs labels; ``sample_weight`` is (B,). Rows labelled
``ignore_index`` give 0 and zero gradients whatever their weight. B = 0 gives empty outputs.
Bad weight values (negative, NaN, inf) raise ValueError on the CPU kernels and are not checked
on CUDA (no host sync); bad labels and temperatures raise RuntimeError on the CPU kernels and give
their rows a NaN loss and NaN gradients on CUDA (no host sync; ``FASTABSLD_DEVICE_ASSERTS=1`` makes
them device asserts instead, a debug mode: an assert ends the CUDA context).

Backends: the C++ kernel (``csrc/kd_kl_div_cpu.cpp``) on CPU tensors; on CUDA tensors the Triton
kernels (``fastabsld.kernels.kd_kl_div``) when triton is installed and the call is one they
implement (no fp64, per-row temperatures only without labels), the plain PyTorch
fallback of this module otherwise (also for every device when ``fastabsld._C`` is not built).
The op's autograd scales the stored gradients by the incoming gradient of ``row_loss``; a
backward run with grad enabled (``create_graph=True``, or one that ``torch.func`` differentiates)
recomputes them through differentiable operations (:func:`forward_math`), so that the op has
reverse-mode derivatives of every order. The op has no forward-mode rule (``register_autograd``
gives none): :func:`kd_kl_div` computes through :func:`forward_math` in forward mode and under
``torch.func`` transforms.

``torch.ops.fastabsld.kd_kl_div_loss`` (``csrc/kd_kl_div_loss.cpp``, only with the extension) is
the same op plus the reduction, with its autograd in C++. Two paths give the same numbers: under
``torch.compile`` (and without the extension) :func:`kd_kl_div` is ``kd_kl_div_forward`` with the
autograd registered here plus a traced reduction; in eager mode it is one call of
``kd_kl_div_loss``, except on CUDA tensors, where the Triton kernels run through their own host
path (``fastabsld.ops.kd_loss_triton``: cached plans, the reduction on the device, one launch for
the backward). At small shapes the cost is dispatch, and that path has the fewest dispatches.
Measured at (B, C) = (128, 10), forward + backward, CPU time on one thread: ~37 us through it,
~45 us for a Python ``torch.autograd.Function`` calling the kernel below autograd, ~100 us through
the custom op's Python autograd, ~92 us for the eager formulation of the released ABSLD code;
``x.sum().backward()`` alone costs ~15 us.

Both eager backends are remembered per call signature (the section "Eager calls by signature"):
a call whose tensors have the metadata of an earlier call that passed the checks, with numbers
of the same types, checks only its numbers and calls the backend directly. At ABSLD's shapes the
checks were a third of the host time of an eager call.

This module reads top to bottom: the schema, the argument checks of the public function, the
fallback kernel and the CUDA dispatch, the registrations (fallback schema, fake kernels,
autograd), the reduction, and the public functions.
"""

import functools
import importlib
import math

import torch
from torch.autograd import forward_ad

import fastabsld.ops.kd_loss_triton as kd_loss_triton
from fastabsld.ops._extension import HAS_EXTENSION
from fastabsld.ops._kernels import HAS_TRITON, kd_kl_div_checks
from fastabsld.ops.checks import check_int, compute_dtype, is_integer_tensor, is_number, short_repr

SCHEMA = (
    "kd_kl_div_forward(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
    "Tensor? teacher_temperature, Tensor? student_temperature, "
    "float teacher_temperature_scalar, float student_temperature_scalar, int ignore_index, "
    "bool student_grad, bool teacher_grad, Tensor? weight=None, Tensor? sample_weight=None, "
    "float sample_weight_scalar=1.) -> (Tensor row_loss, Tensor grad_student, Tensor grad_teacher)"
)
OP = "fastabsld::kd_kl_div_forward"
REDUCTIONS = ("none", "sum", "batchmean", "mean")
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64"}
# The positive floats that round to a positive finite value of each compute dtype: above the
# first bound (half the smallest subnormal, which rounds to 0) up to the largest finite value.
_HELD_RANGE = {torch.float32: (2.0 ** -150, torch.finfo(torch.float32).max),
               torch.float64: (0.0, torch.finfo(torch.float64).max)}


# ----------------------------------------------------------------------------------------------
# Argument checks of the public function (once per call; the kernels trust them).


def _check_logits(student_logits, teacher_logits):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"{name} must have shape (..., C) with at least one leading (row) dimension, "
                             f"got shape {tuple(x.shape)}")
        if x.dtype not in LOGIT_DTYPES:
            raise ValueError(f"{name} must be fp32, fp16, bf16 or fp64, got {x.dtype}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if student_logits.shape[-1] < 1:
        raise ValueError(f"the logits need at least one class, got shape {tuple(student_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits ({student_logits.device}) and teacher_logits "
                         f"({teacher_logits.device}) must be on one device")


def _shape_text(lead, trailing=()):
    """How a shape of the logits' leading dimensions reads in a message: (B,) or (...) with sizes."""
    names = "(B" + (", 1)" if trailing else ",)") if len(lead) == 1 else \
        "(" + ", ".join(["..."] + ["1"] * len(trailing)) + ")"
    return f"{names} = {tuple(lead) + tuple(trailing)}"


def _check_labels(labels, lead, device):
    """Labels of the logits' leading shape, as (rows,) int64."""
    if labels is None:
        return None
    if not is_integer_tensor(labels):
        raise ValueError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != lead:
        raise ValueError(f"labels must have the logits' leading shape {_shape_text(lead)}, got shape "
                         f"{tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels ({labels.device}) must be on the logits' device ({device})")
    labels = labels if labels.dtype == torch.int64 else labels.long()
    return labels if len(lead) == 1 else labels.reshape(-1)


def _check_float_tensor(value, name, device):
    """The checks every float tensor argument shares: dtype, no grad, device (0-d tensors may be on the CPU)."""
    if not value.dtype.is_floating_point:  # False for complex dtypes too
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} must not require grad: the loss gives it no gradient")
    if value.device != device and not (value.dim() == 0 and value.device.type == "cpu"):
        raise ValueError(f"{name} ({value.device}) must be on the logits' device ({device})")


def _host_number(value, device):
    """True for a 0-d CPU tensor given with logits elsewhere, read as a number in eager mode.

    Reading a CPU tensor waits for nothing on the GPU; copying it to the device would be a copy
    per call and is not allowed under CUDA-graph capture. Under tracing it stays a tensor.
    """
    return value.dim() == 0 and value.device.type == "cpu" and device.type != "cpu" and \
        not torch.compiler.is_compiling()


def _check_number(value, name, dtype, *, strict):
    """A number temperature or weight, as a float that ``dtype`` holds (it is used in ``dtype``).

    Written with comparisons only (no ``math.isfinite``), so that ``torch.compile`` with dynamic
    shapes traces it when the number is symbolic.
    """
    smallest, largest = _HELD_RANGE[dtype]
    if type(value) is float and smallest < value <= largest:  # the common case
        return value
    if isinstance(value, torch.SymFloat):
        number = value
    elif is_number(value):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    else:
        wanted = "positive and finite" if strict else "non-negative and finite"
        raise ValueError(f"{name} must be a number ({wanted}), got {type(value).__name__} {value!r}")
    if not ((number > 0 if strict else number >= 0) and number < math.inf):
        raise ValueError(f"{name} must be {'positive' if strict else 'non-negative'} and finite, "
                         f"got {short_repr(value)}")
    if isinstance(number, torch.SymFloat):
        return number
    if number > largest:
        raise ValueError(f"{name} = {number:.6g} overflows {_DTYPE_NAMES[dtype]} (largest {largest:.6g}), "
                         f"the dtype the loss computes in for these logits; pass fp64 logits for it")
    if 0 < number <= smallest:
        raise ValueError(f"{name} = {number:.6g} underflows {_DTYPE_NAMES[dtype]} to 0 (smallest positive "
                         f"{2 * smallest:.6g}), the dtype the loss computes in for these logits; pass fp64 "
                         "logits for it")
    return number


def _check_temperature(value, name, labels, lead, num_classes, device, dtype):
    """Splits a temperature into the op's (tensor or None, scalar) pair; rows = prod(lead).

    A (C,) tensor is per class and needs labels; a (*lead, 1) tensor is per row (flattened to
    (rows, 1)); a 0-d tensor becomes a stride-0 view of its value, per class with labels (the
    form every backend takes) and per row without.
    """
    if not isinstance(value, torch.Tensor):
        return None, _check_number(value, name, dtype, strict=True)
    _check_float_tensor(value, name, device)
    if _host_number(value, device):  # a CPU scalar for device logits: a number, not a copy to the device
        return None, _check_number(value.item(), name, dtype, strict=True)
    rows_shape = tuple(lead) + (1,)
    if value.dim() == 0:
        value = value.to(device, dtype)
        if labels is not None:
            return value.expand(num_classes), 1.0
        return value.reshape(1, 1).expand(math.prod(lead), 1), 1.0
    if value.dim() == 1:
        if labels is None:
            raise ValueError(f"{name} of shape {tuple(value.shape)} is per class and needs labels; for one "
                             f"temperature per row pass a {_shape_text(lead, (1,))} tensor, e.g. tau[..., None]")
        if value.shape[0] != num_classes:
            raise ValueError(f"{name} per class must have shape (C,) = ({num_classes},), got {tuple(value.shape)}")
    elif tuple(value.shape) != rows_shape:
        raise ValueError(f"{name} must be a number, a 0-d tensor, a (C,) = ({num_classes},) tensor (per class, "
                         f"with labels) or a {_shape_text(lead, (1,))} tensor (per row), got shape "
                         f"{tuple(value.shape)}")
    elif len(lead) != 1:
        value = value.reshape(-1, 1)
    return (value if value.dtype == dtype else value.to(dtype)), 1.0


def _check_weight(weight, labels, num_classes, device):
    """The per-class weight: None or a (C,) float tensor, with labels."""
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be None or a (C,) = ({num_classes},) tensor, got {type(weight).__name__}")
    _check_float_tensor(weight, "weight", device)
    if weight.shape != (num_classes,):
        raise ValueError(f"weight must have shape (C,) = ({num_classes},), got shape {tuple(weight.shape)}")
    if labels is None:
        raise ValueError("weight is per class and needs labels (as in F.cross_entropy); for per-row weights "
                         "pass sample_weight")
    return weight


def _check_sample_weight(sample_weight, lead, device, dtype):
    """Splits the per-row weight into the op's (tensor or None, scalar) pair; a tensor flattened to (rows,)."""
    if sample_weight is None:
        return None, 1.0
    if not isinstance(sample_weight, torch.Tensor):
        return None, _check_number(sample_weight, "sample_weight", dtype, strict=False)
    _check_float_tensor(sample_weight, "sample_weight", device)
    if _host_number(sample_weight, device):
        return None, _check_number(sample_weight.item(), "sample_weight", dtype, strict=False)
    if sample_weight.dim() == 0:
        return sample_weight.to(device).reshape(1).expand(math.prod(lead)), 1.0
    if sample_weight.shape != lead:
        raise ValueError(f"sample_weight must be a number or a tensor of the logits' leading shape "
                         f"{_shape_text(lead)}, got shape {tuple(sample_weight.shape)}")
    return (sample_weight if len(lead) == 1 else sample_weight.reshape(-1)), 1.0


# ----------------------------------------------------------------------------------------------
# The fallback kernel (plain PyTorch) and the CUDA dispatch.


def accumulation_dtype(student_logits, teacher_logits):
    """The dtype the op computes and returns ``row_loss`` in.

    Args:
        student_logits: the student's logits.
        teacher_logits: the teacher's logits.

    Returns:
        torch.dtype: fp64 when either input is fp64, else fp32.
    """
    return compute_dtype(student_logits, teacher_logits)


def _check_kinds(labels, temperatures, weight):
    """The op's own shape rule, which the public function's checks imply: a (C,) tensor needs labels."""
    if labels is not None:
        return
    for name, tau in temperatures:
        if tau is not None and tau.dim() == 1:
            raise RuntimeError(f"kd_kl_div_forward: {name} of shape (C,) is per class and needs labels; "
                               "per-row temperatures have shape (B, 1)")
    if weight is not None:
        raise RuntimeError("kd_kl_div_forward: weight is per class and needs labels")


def _row_temperatures(tensor, scalar, labels, compute, device):
    """(B, 1) per-row temperatures from a (C,) or (B, 1) tensor, or a 0-d tensor for the scalar."""
    if tensor is None:
        return torch.tensor(scalar, dtype=compute, device=device)
    if tensor.dim() == 1:
        tensor = tensor[labels.clamp(0, tensor.shape[0] - 1)]  # ignored rows may hold any label
    return tensor.to(device, compute).reshape(-1, 1)


def _row_weights(weight, sample_weight, sample_weight_scalar, labels, compute, device):
    """(B, 1) row weights; a number when every row has the same one; None when it is 1."""
    rows = None
    if weight is not None:
        rows = weight.to(device, compute)[labels.clamp(0, weight.shape[0] - 1)]  # ignored rows: any label
    if sample_weight is not None:
        sample = sample_weight.to(device, compute)
        rows = sample if rows is None else rows * sample
    if rows is None:
        return None if sample_weight_scalar == 1.0 else sample_weight_scalar
    rows = rows.reshape(-1, 1)
    return rows if sample_weight_scalar == 1.0 else rows * sample_weight_scalar


def fallback_forward(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                     teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad,
                     teacher_grad, weight=None, sample_weight=None, sample_weight_scalar=1.0):
    """The op in plain PyTorch: the backend where no compiled kernel applies.

    Args and Returns: as ``torch.ops.fastabsld.kd_kl_div_forward`` (module docstring).
    """
    num_classes = student_logits.shape[1]
    temperatures = [("teacher_temperature", teacher_temperature), ("student_temperature", student_temperature)]
    _check_kinds(labels, temperatures, weight)
    if student_logits.device.type == "cpu":
        kd_kl_div_checks.check_values(labels, temperatures, [("weight", weight), ("sample_weight", sample_weight)],
                                      ignore_index, num_classes)
    for name, value in (("teacher_temperature", teacher_temperature_scalar),
                        ("student_temperature", student_temperature_scalar)):
        if not (0 < value < float("inf")):
            raise RuntimeError(f"kd_kl_div_forward: {name} must be positive and finite, got {value:.6g}")
    if not (0 <= sample_weight_scalar < float("inf")):
        raise ValueError(f"kd_kl_div_forward: sample_weight_scalar must be non-negative and finite, "
                         f"got {sample_weight_scalar:.6g}")
    return forward_math(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                        teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad,
                        teacher_grad, weight, sample_weight, sample_weight_scalar)


def forward_math(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                 teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad,
                 teacher_grad, weight=None, sample_weight=None, sample_weight_scalar=1.0):
    """The op's formulas in differentiable PyTorch operations, on arguments already checked.

    The fallback kernel runs it; the op's autograd runs it again when a derivative of a derivative
    is asked for (its outputs are differentiable to any order, in reverse and forward mode).

    Args and Returns: as ``torch.ops.fastabsld.kd_kl_div_forward`` (module docstring).
    """
    compute = accumulation_dtype(student_logits, teacher_logits)
    device = student_logits.device
    tau_t = _row_temperatures(teacher_temperature, teacher_temperature_scalar, labels, compute, device)
    tau_s = _row_temperatures(student_temperature, student_temperature_scalar, labels, compute, device)
    row_weights = _row_weights(weight, sample_weight, sample_weight_scalar, labels, compute, device)
    log_p = torch.log_softmax(teacher_logits.to(compute) / tau_t, dim=1)
    log_q = torch.log_softmax(student_logits.to(compute) / tau_s, dim=1)
    p = log_p.exp()
    zero = torch.zeros((), dtype=compute, device=device)
    diff = torch.where(p > 0, log_p, zero) - torch.where(p > 0, log_q, zero)  # 0 log 0 = 0
    kl = (p * diff).sum(dim=1)
    if row_weights is None:
        rows = kl
    else:
        rows = kl * (row_weights.reshape(-1) if isinstance(row_weights, torch.Tensor) else row_weights)
    kept = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != ignore_index
    rows = torch.where(kept, rows, zero)
    kept = kept.unsqueeze(1)
    grad_s = student_logits.new_empty((0,))
    grad_t = teacher_logits.new_empty((0,))
    if student_grad:
        grad = (log_q.exp() - p) / tau_s
        grad = grad if row_weights is None else grad * row_weights
        grad_s = torch.where(kept, grad, zero).to(student_logits.dtype)
    if teacher_grad:
        grad = p * (diff - kl.unsqueeze(1)) / tau_t
        grad = grad if row_weights is None else grad * row_weights
        grad_t = torch.where(kept, grad, zero).to(teacher_logits.dtype)
    return rows, grad_s.contiguous(), grad_t.contiguous()


@functools.cache
def triton_forward():
    """The Triton launcher ``fastabsld.kernels.kd_kl_div.kd_kl_div_forward``, or None.

    Returns:
        callable or None: None when triton or the kernel module cannot be imported.
    """
    if not HAS_TRITON:
        return None
    try:
        return importlib.import_module("fastabsld.kernels.kd_kl_div").kd_kl_div_forward
    except ImportError:
        return None


def _launcher_temperature(tau, labels):
    """A temperature in the Triton launcher's terms: (C,) with labels, (B,) without; False if it has none."""
    if tau is None or (tau.dim() == 1 and labels is not None):
        return tau
    if tau.dim() == 2 and labels is None:
        return tau.reshape(-1)
    return False


FORWARD_MODE_MESSAGE = ("fastabsld::kd_kl_div_forward has no forward-mode derivative: call fastabsld.loss.kd_kl_div "
                        "(or fastabsld.ops.kd_loss.kd_kl_div_forward), which computes through differentiable "
                        "operations in forward mode and under torch.func")


def _refuse_tangents(*logits):
    """The op's kernels refuse inputs with a forward-mode tangent (its autograd is reverse mode only).

    Raises:
        NotImplementedError: a tangent would otherwise be dropped without a word.
    """
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in logits):
        raise NotImplementedError(FORWARD_MODE_MESSAGE)


def _fallback_kernel(student_logits, teacher_logits, *args):
    """The op's kernel without the extension: :func:`fallback_forward` for inputs without a tangent."""
    _refuse_tangents(student_logits, teacher_logits)
    return fallback_forward(student_logits, teacher_logits, *args)


def _cuda_forward(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                  teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad,
                  teacher_grad, weight=None, sample_weight=None, sample_weight_scalar=1.0):
    """The op on CUDA tensors: the Triton kernels for what they implement, the fallback for the rest.

    fp64 logits and per-row temperatures with labels run the fallback: the Triton kernels have no
    form for them.
    """
    _refuse_tangents(student_logits, teacher_logits)
    args = (student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
            teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad, teacher_grad)
    weights = (weight, sample_weight, sample_weight_scalar)
    _check_kinds(labels, [("teacher_temperature", teacher_temperature),
                          ("student_temperature", student_temperature)], weight)
    launcher = triton_forward()
    tau_t = _launcher_temperature(teacher_temperature, labels)
    tau_s = _launcher_temperature(student_temperature, labels)
    if launcher is None or tau_t is False or tau_s is False or \
            torch.float64 in (student_logits.dtype, teacher_logits.dtype):  # the Triton kernel has no fp64
        return fallback_forward(*args, *weights)
    return launcher(student_logits, teacher_logits, labels, tau_t, tau_s, teacher_temperature_scalar,
                    student_temperature_scalar, ignore_index, student_grad, teacher_grad, *weights)


# ----------------------------------------------------------------------------------------------
# Registrations: the schema (when the extension is missing), the kernels, fake kernels, autograd.

if not HAS_EXTENSION:
    _LIB = torch.library.Library("fastabsld", "FRAGMENT")
    _LIB.define(SCHEMA)
    _LIB.impl("kd_kl_div_forward", _fallback_kernel, "CompositeExplicitAutograd")
_CUDA_LIB = torch.library.Library("fastabsld", "IMPL")
_CUDA_LIB.impl("kd_kl_div_forward", _cuda_forward, "CUDA")


@torch.library.register_fake(OP)
def _kd_kl_div_forward_fake(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                            teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad,
                            teacher_grad, weight=None, sample_weight=None, sample_weight_scalar=1.0):
    batch, num_classes = student_logits.shape
    rows = student_logits.new_empty((batch,), dtype=accumulation_dtype(student_logits, teacher_logits))
    grad_s = student_logits.new_empty((batch, num_classes) if student_grad else (0,))
    grad_t = teacher_logits.new_empty((batch, num_classes) if teacher_grad else (0,))
    return rows, grad_s, grad_t


if HAS_EXTENSION:
    @torch.library.register_fake("fastabsld::kd_kl_div_loss")
    def _kd_kl_div_loss_fake(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                             teacher_temperature_scalar, student_temperature_scalar, ignore_index, reduction,
                             weight=None, sample_weight=None, sample_weight_scalar=1.0):
        shape = (student_logits.shape[0],) if reduction == "none" else ()
        return student_logits.new_empty(shape, dtype=accumulation_dtype(student_logits, teacher_logits))


def scale_rows(grad, grad_rows):
    """``grad`` (B, C) scaled per row by ``grad_rows`` ((B,), any strides), in ``grad``'s dtype.

    Args:
        grad: the stored gradient.
        grad_rows: the incoming gradient of the row losses.

    Returns:
        Tensor: (B, C) in ``grad``'s dtype.
    """
    return grad * grad_rows.unsqueeze(1).to(grad.dtype)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.student_grad, ctx.teacher_grad = inputs[8], inputs[9]
    ctx.inputs = inputs  # for a backward that is itself differentiated (read only then)


def differentiable_backward(inputs, grad_rows, student_grad, teacher_grad):
    """The op's backward in differentiable operations, for a backward that is itself differentiated.

    Recomputes the gradients from the op's inputs with :func:`forward_math`, so that autograd
    records how they depend on the logits (the stored gradients of the fused pass are constants to
    it). Used when the backward runs with grad enabled (``create_graph=True``, ``torch.func``).

    Args:
        inputs: the op's 13 arguments.
        grad_rows: the incoming gradient of ``row_loss``, shape (B,).
        student_grad: whether to return the student's gradient.
        teacher_grad: whether to return the teacher's gradient.

    Returns:
        tuple: (gradient of the student's logits or None, of the teacher's logits or None).
    """
    _, grad_s, grad_t = forward_math(*inputs[:8], student_grad, teacher_grad, *inputs[10:])
    return (scale_rows(grad_s, grad_rows) if student_grad else None,
            scale_rows(grad_t, grad_rows) if teacher_grad else None)


def _backward(ctx, grad_rows, _grad_gs, _grad_gt):
    if grad_rows is None:
        return (None,) * 13
    if torch.is_grad_enabled():
        return differentiable_backward(ctx.inputs, grad_rows, ctx.student_grad, ctx.teacher_grad) + (None,) * 11
    grad_s, grad_t = ctx.saved_tensors
    out_s = scale_rows(grad_s, grad_rows) if ctx.student_grad else None
    out_t = scale_rows(grad_t, grad_rows) if ctx.teacher_grad else None
    return (out_s, out_t) + (None,) * 11


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)
if HAS_TRITON:  # the Triton op torch.compile traces on CUDA: kd_kl_div_forward's schema and autograd
    torch.library.register_autograd(kd_loss_triton.TRITON_OP, _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# The reduction of the traced path, and the choice between the eager and the traced path.


def _row_denominator(reduction, labels, ignore_index, batch, num_classes):
    """What the sum of row losses is divided by: None, a number, or a 0-d tensor (no host sync).

    At least one row is counted: with none, the sum (0) stays 0 and its gradients zero.
    """
    if reduction in ("none", "sum"):
        return None
    per_row = num_classes if reduction == "mean" else 1
    if labels is None:
        return float(torch.sym_max(batch, 1) * per_row)
    count = (labels != ignore_index).sum().clamp_min(1)
    return count * per_row if per_row != 1 else count


def _reduce(rows, reduction, denominator):
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if denominator is None else total / denominator


def _eager_fast_path(*tensors):
    """True for plain tensors outside tracing, modes and functorch: the C++ loss op may run."""
    if not HAS_EXTENSION or torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors) and \
        torch._C._len_torch_dispatch_stack() == 0 and not _forward_mode_or_functorch()


def _forward_mode_or_functorch():
    """True where the loss runs as :func:`forward_math`: forward-mode AD or a ``torch.func`` transform.

    The op's registered autograd has reverse mode only (a custom op gets no forward-mode rule and
    no ``torch.func`` support from ``register_autograd``), so there the loss is computed through
    differentiable PyTorch operations, whose derivatives of every order and mode torch knows.
    """
    return forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _differentiable_forward(*args):
    """The op's outputs through :func:`forward_math`, with the CPU value checks where they can run.

    Under ``torch.func`` transforms a value check (a data-dependent branch) cannot run.
    """
    return (forward_math if torch._C._are_functorch_transforms_active() else fallback_forward)(*args)


# ----------------------------------------------------------------------------------------------
# Eager calls by signature: a call with the metadata of an earlier one skips the checks that one
# passed and goes straight to the backend it took.
#
# The signature holds everything the checks and the routing read, except the values of number
# arguments, which are checked on every call: each tensor's type, shape, strides, dtype, device,
# 16-byte alignment and requires_grad; the types of the number arguments; the reduction, the
# ignore_index; grad mode and the routing's switches. A call is remembered only when it took an
# eager backend (the Triton host path or the extension's loss op) with its tensors as given (no
# conversion per call) and 2-D logits.

# Signatures remembered at most (cleared when full: shapes that change every call would grow it).
EAGER_CALLS_KEPT = 512
_EAGER_CALLS = {}


class _Uncacheable(Exception):
    """An argument whose kind the signature does not cover: the call goes through the checks."""


def _tensor_signature(x):
    if x is None:
        return None
    if type(x) is not torch.Tensor:  # subclasses and wrappers, or not a tensor: not cached
        raise _Uncacheable
    return x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0, x.requires_grad


def _value_signature(x):
    kind = type(x)
    if kind is torch.Tensor:
        return x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0, x.requires_grad
    if kind is float or kind is int or x is None:
        return kind
    raise _Uncacheable


def _eager_signature(student_logits, teacher_logits, labels, teacher_temperature, student_temperature, reduction,
                     ignore_index, weight, sample_weight):
    """The call's signature (see above), or None where a call is never remembered (tracing, modes,
    functorch, forward-mode AD, arguments of other kinds)."""
    s, t = student_logits, teacher_logits
    if type(s) is not torch.Tensor or type(t) is not torch.Tensor or type(reduction) is not str \
            or type(ignore_index) is not int or torch.compiler.is_compiling() \
            or torch._C._len_torch_dispatch_stack() or _forward_mode_or_functorch():
        return None
    try:
        device = s.device
        return (reduction, ignore_index, torch.is_grad_enabled(), device.type in kd_loss_triton.EAGER_DEVICES,
                kd_loss_triton.device_asserts(),
                s.shape, s.stride(), s.dtype, device, s.data_ptr() % 16 == 0, s.requires_grad,
                t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0, t.requires_grad,
                _tensor_signature(labels), _tensor_signature(weight), _value_signature(teacher_temperature),
                _value_signature(student_temperature), _value_signature(sample_weight))
    except (_Uncacheable, RuntimeError):  # RuntimeError: a layout without strides (sparse, nested)
        return None


def _passed_as_given(given, checked):
    """Whether the checks passed every tensor argument on unchanged (numbers become None)."""
    return all(c is g if type(g) is torch.Tensor else c is None for g, c in zip(given, checked))


def _remember(signature, call, dtype):
    if len(_EAGER_CALLS) >= EAGER_CALLS_KEPT:
        _EAGER_CALLS.clear()
    _EAGER_CALLS[signature] = (call, dtype)


def _known_value(value, name, dtype, strict):
    """A temperature or sample weight of a remembered call: (tensor, 1.0), (None, the checked number)
    or (None, 1.0) for None."""
    if type(value) is torch.Tensor:
        return value, 1.0
    if value is None:
        return None, 1.0
    return None, _check_number(value, name, dtype, strict=strict)


class _ExtensionCall:
    """The extension's loss op (``torch.ops.fastabsld.kd_kl_div_loss``) for one reduction and ignore_index."""

    __slots__ = ("reduction", "ignore_index")

    def __init__(self, reduction, ignore_index):
        self.reduction = reduction
        self.ignore_index = ignore_index

    def __call__(self, student_logits, teacher_logits, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, weight,
                 sample_weight, sample_weight_scalar):
        return torch.ops.fastabsld.kd_kl_div_loss.default(
            student_logits, teacher_logits, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, self.ignore_index,
            self.reduction, weight, sample_weight, sample_weight_scalar)


# ----------------------------------------------------------------------------------------------
# Public functions.


def kd_kl_div_forward(student_logits, teacher_logits, labels=None, teacher_temperature=None,
                      student_temperature=None, teacher_temperature_scalar=1.0, student_temperature_scalar=1.0,
                      ignore_index=-100, student_grad=True, teacher_grad=False, weight=None, sample_weight=None,
                      sample_weight_scalar=1.0):
    """Per-row KD loss and its gradients in one pass (``torch.ops.fastabsld.kd_kl_div_forward``).

    Differentiable through ``row_loss`` in the logits whose ``*_grad`` flag is set, to any order.
    A thin call of the op: the arguments are the op's (see the module docstring), checked by its
    kernels. In forward mode and under ``torch.func`` transforms it computes the same outputs
    through :func:`forward_math` (the op itself has no forward-mode rule: called directly there,
    ``torch.ops.fastabsld.kd_kl_div_forward`` gives no tangent).

    Args:
        student_logits: (B, C) fp32/fp16/bf16/fp64, any strides.
        teacher_logits: (B, C), same choice of dtypes (may differ from the student's).
        labels: (B,) int64 or None.
        teacher_temperature: (C,) per class (needs labels), (B, 1) per row, or None for the scalar.
        student_temperature: likewise.
        teacher_temperature_scalar: the teacher's temperature where the tensor is None.
        student_temperature_scalar: the student's temperature where the tensor is None.
        ignore_index: label of rows that give 0 and zero gradients.
        student_grad: compute and store d row_loss / d student_logits.
        teacher_grad: compute and store d row_loss / d teacher_logits.
        weight: (C,) per-class row weights (needs labels) or None.
        sample_weight: (B,) per-row weights or None.
        sample_weight_scalar: a weight of every row.

    Returns:
        tuple: (row_loss (B,), grad_student (B, C) or (0,), grad_teacher (B, C) or (0,)).
    """
    args = (student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
            float(teacher_temperature_scalar), float(student_temperature_scalar), int(ignore_index),
            bool(student_grad), bool(teacher_grad), weight, sample_weight, float(sample_weight_scalar))
    if _forward_mode_or_functorch():
        return _differentiable_forward(*args)
    return torch.ops.fastabsld.kd_kl_div_forward(*args)


def kd_kl_div(student_logits, teacher_logits, *, labels=None, teacher_temperature=1.0, student_temperature=1.0,
              reduction="batchmean", ignore_index=-100, weight=None, sample_weight=None):
    """Weighted KL divergence from the tempered teacher's to the tempered student's softmax, fused.

    Per row i: ``loss_i = w_i * KL(softmax(t_i / tau_t) || softmax(s_i / tau_s))`` with
    ``w_i = weight[labels[i]] * sample_weight[i]`` (1 for an argument left None) and 0 log 0 = 0
    (a teacher logit of -inf rules a class out), computed with its gradient in one pass (fp32
    accumulation; fp64 for fp64 logits). Gradients flow to the logits that require grad, in their
    dtypes; temperatures and weights receive none.

    Shapes: the logits are (..., C); every leading dimension indexes rows, and the loss is that of
    the (N, C) flattened logits, N the product of the leading sizes. ``labels`` and a tensor
    ``sample_weight`` have the leading shape; a per-row temperature has the leading shape and a
    trailing 1; "none" returns the leading shape.

    Reductions: "none" gives ``loss_i``; "sum" their sum; "batchmean" the sum divided by the
    number of counted rows, N for (..., C) logits (not by the sum of the weights: a reweighting
    scheme normalises its weights itself); "mean" the sum divided by counted rows * C (the
    per-element mean of the released ABSLD code). For N-d logits "batchmean" thus differs from
    ``F.kl_div``'s, which divides by the first dimension only: for (B, T, C) sequence logits this
    is the mean over all B * T tokens, which is the flattened (B * T, C) loss. Rows labelled
    ``ignore_index`` give 0 and are not counted.

    No counted row (B = 0, or every row ignored): the loss is 0 for every reduction ("none": zeros
    of the leading shape) and the gradients are zero. The loss is a sum over counted rows divided
    by a count; with no rows the sum is 0, and the count is taken as at least 1, so that a
    micro-batch of padding only adds nothing to an accumulated loss or gradient, where 0 / 0 (NaN)
    would poison every weight it reaches. (torch's mean-reduced losses give NaN there.)

    Derivatives: of every order in reverse mode (a backward run with ``create_graph=True``, as in
    gradient penalties, ``torch.autograd.functional.hessian``), in forward mode
    (``torch.autograd.forward_ad``, ``torch.func.jvp``/``jacfwd``) and under ``torch.func``
    transforms (``grad``, ``vmap``, ``jacrev``). A first-order backward scales the gradient stored
    by the fused pass; a backward that is itself differentiated recomputes the gradient through
    differentiable operations. In forward mode and under ``torch.func`` the loss is computed
    through differentiable PyTorch operations (the same formulas; under ``torch.func`` transforms
    the values inside tensor arguments are not checked, as that needs a data-dependent branch).

    Temperatures come in three kinds, told apart by shape, so that a missing ``labels`` cannot
    silently turn per-class values into per-row ones (as it would when B == C): a number or 0-d
    tensor for every row; a (C,) tensor, one value per class, used as ``temperature[labels[i]]``
    (it needs labels); a (..., 1) tensor of the leading shape and a trailing 1, one value per row
    (``tau[..., None]``; (B, 1) for (B, C) logits), which reads as the broadcast of ``logits / tau``
    over each row's C columns.

    Args:
        student_logits: (..., C) logits, fp32/fp16/bf16/fp64, any strides.
        teacher_logits: (..., C) logits; its dtype may differ from the student's.
        labels: integer labels of the logits' leading shape, or None. They select per-class
            temperatures and weights, and rows labelled ``ignore_index`` are left out. Other
            labels must lie in [0, C).
        teacher_temperature: a positive finite number (that the compute dtype holds: fp32
            underflows below 1.4e-45 and overflows above 3.4e38), a 0-d tensor, a (C,) tensor (per
            class, needs labels) or a (..., 1) tensor (per row); floating-point, on the logits'
            device (a 0-d tensor may be on the CPU).
        student_temperature: likewise.
        reduction: "none", "sum", "batchmean" or "mean" (see above).
        ignore_index: label of rows that contribute nothing and are not counted.
        weight: None or a (C,) floating-point tensor of non-negative per-class weights, as the
            ``weight`` of ``F.cross_entropy``; needs labels.
        sample_weight: None, a non-negative finite number, or a 0-d floating-point tensor or one
            of the logits' leading shape, of non-negative per-row weights.

    Returns:
        Tensor: the loss, fp32 (fp64 for fp64 logits); the logits' leading shape for "none",
        else 0-d.

    Raises:
        ValueError: bad shapes, dtypes, devices, reduction; a non-positive/non-finite number
            temperature, or one the compute dtype cannot hold; a (C,) temperature or a weight
            without labels; a temperature or weight tensor that requires grad; a negative, NaN or
            infinite weight (tensor values checked on CPU tensors only: no host sync on CUDA). A
            label outside [0, C) or a bad value inside a temperature tensor is a RuntimeError from
            the kernel on CPU tensors; on CUDA the row's loss and gradients are NaN (with
            ``FASTABSLD_DEVICE_ASSERTS=1``, a device-side assert). A 0-d CPU temperature or sample
            weight with CUDA logits is read as a number (a ValueError when it is not positive, or
            non-negative, and finite) and never copied.
    """
    signature = _eager_signature(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                                 reduction, ignore_index, weight, sample_weight)
    if signature is not None:
        known = _EAGER_CALLS.get(signature)
        if known is not None:  # metadata checked before: only the numbers are new
            call, dtype = known
            tau_t, tau_t_scalar = _known_value(teacher_temperature, "teacher_temperature", dtype, True)
            tau_s, tau_s_scalar = _known_value(student_temperature, "student_temperature", dtype, True)
            sample, sample_scalar = (None, 1.0) if sample_weight is None else \
                _known_value(sample_weight, "sample_weight", dtype, False)
            return call(student_logits, teacher_logits, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, weight,
                        sample, sample_scalar)
    _check_logits(student_logits, teacher_logits)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    ignore_index = check_int(ignore_index, "ignore_index")
    lead, num_classes = student_logits.shape[:-1], student_logits.shape[-1]
    if len(lead) != 1:  # leading dimensions are rows
        student_logits = student_logits.reshape(-1, num_classes)
        teacher_logits = teacher_logits.reshape(-1, num_classes)
    batch = student_logits.shape[0]
    device = student_logits.device
    given = (labels, teacher_temperature, student_temperature, weight, sample_weight)
    labels = _check_labels(labels, lead, device)
    tau_dtype = accumulation_dtype(student_logits, teacher_logits)
    tau_t, tau_t_scalar = _check_temperature(teacher_temperature, "teacher_temperature", labels, lead,
                                             num_classes, device, tau_dtype)
    tau_s, tau_s_scalar = _check_temperature(student_temperature, "student_temperature", labels, lead,
                                             num_classes, device, tau_dtype)
    weight = _check_weight(weight, labels, num_classes, device)
    sample_weight, weight_scalar = _check_sample_weight(sample_weight, lead, device, tau_dtype)
    args = (student_logits, teacher_logits, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, ignore_index)
    weights = (weight, sample_weight, weight_scalar)
    call = None
    if kd_loss_triton.applies(student_logits, teacher_logits, labels, tau_t, tau_s, weight, sample_weight):
        # CUDA, eager: the Triton host path (a backward with create_graph goes through the traced path)
        call = kd_loss_triton.eager_call(student_logits, teacher_logits, labels, tau_t, tau_s, ignore_index,
                                         reduction, weight, sample_weight, traced=_traced_loss)
        cacheable = call.cacheable
    elif _eager_fast_path(student_logits, teacher_logits, labels, tau_t, tau_s, weight, sample_weight):
        call, cacheable = _ExtensionCall(reduction, ignore_index), True
    if call is not None:
        if signature is not None and cacheable and len(lead) == 1 and \
                _passed_as_given(given, (labels, tau_t, tau_s, weight, sample_weight)):
            _remember(signature, call, tau_dtype)
        loss = call(student_logits, teacher_logits, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, *weights)
    elif _forward_mode_or_functorch():
        # Value checks need a data-dependent branch, which torch.func transforms do not allow.
        denominator = _row_denominator(reduction, labels, ignore_index, batch, num_classes)
        loss = _reduce(_differentiable_forward(*args, False, False, *weights)[0], reduction, denominator)
    else:
        loss = _traced_loss(*args, reduction, *weights)
    return loss if len(lead) == 1 or reduction != "none" else loss.reshape(lead)


def _traced_loss(student_logits, teacher_logits, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, ignore_index,
                 reduction, weight, sample_weight, weight_scalar):
    """The loss through the forward op (its registered autograd) and a traced reduction; checked arguments."""
    batch, num_classes = student_logits.shape
    denominator = _row_denominator(reduction, labels, ignore_index, batch, num_classes)
    grad_on = torch.is_grad_enabled()
    forward = kd_loss_triton.traced_op(student_logits, teacher_logits, labels, tau_t, tau_s)  # CUDA: the Triton op
    rows, _, _ = forward(student_logits, teacher_logits, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar,
                         ignore_index, grad_on and student_logits.requires_grad,
                         grad_on and teacher_logits.requires_grad, weight, sample_weight, weight_scalar)
    return _reduce(rows, reduction, denominator)
