"""The fused knowledge-distillation loss: the ops ``kd_kl_div_forward`` / ``kd_kl_div_loss`` and ``kd_kl_div``.

Per row i (s, t: the student's and teacher's logits; C columns), with p = softmax(t / tau_t)
and q = softmax(s / tau_s) computed in fp32 (fp64 for fp64 logits), the op
``torch.ops.fastabsld.kd_kl_div_forward`` returns

* ``row_loss[i] = sum_c p_c (log p_c - log q_c)`` (0 log 0 = 0), shape (B,), fp32 (fp64);
* ``grad_student[i] = (q - p) / tau_s`` in the student's dtype, or an empty (0,) tensor;
* ``grad_teacher[i] = p * ((log p - log q) - row_loss[i]) / tau_t`` in the teacher's dtype, or
  an empty (0,) tensor.

A temperature tensor (fp32) holds one value per class (indexed by ``labels``) or, without
labels, one per row; the scalar is used where the tensor is None. Rows labelled
``ignore_index`` give 0 and zero gradients.

Backends: the C++ kernel (``csrc/kd_kl_div_cpu.cpp``) on CPU tensors; the Triton kernels
(``fastabsld.kernels.kd_kl_div``) on CUDA tensors when triton is installed; the plain PyTorch
fallback of this module otherwise (also for every device when ``fastabsld._C`` is not built).
The op's autograd only scales the stored gradients by the incoming gradient of ``row_loss``.

``torch.ops.fastabsld.kd_kl_div_loss`` (``csrc/kd_kl_div_loss.cpp``, only with the extension) is
the same op plus the reduction, with its autograd in C++. Two paths give the same numbers: under
``torch.compile`` (and without the extension) :func:`kd_kl_div` is ``kd_kl_div_forward`` with the
autograd registered here plus a traced reduction; in eager mode it is one call of
``kd_kl_div_loss``. At small shapes the cost is dispatch, and that path has the fewest dispatches.
Measured at (B, C) = (128, 10), forward + backward, CPU time on one thread: ~37 us through it,
~45 us for a Python ``torch.autograd.Function`` calling the kernel below autograd, ~100 us through
the custom op's Python autograd, ~92 us for the eager formulation of the released ABSLD code;
``x.sum().backward()`` alone costs ~15 us.

This module reads top to bottom: the schema, the argument checks of the public function, the
fallback kernel and the CUDA dispatch, the registrations (fallback schema, fake kernels,
autograd), the reduction, and the public functions.
"""

import functools
import importlib

import torch

from fastabsld.ops._extension import HAS_EXTENSION
from fastabsld.ops._kernels import HAS_TRITON
from fastabsld.ops.checks import check_int, check_real, compute_dtype, is_integer_tensor

SCHEMA = (
    "kd_kl_div_forward(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
    "Tensor? teacher_temperature, Tensor? student_temperature, "
    "float teacher_temperature_scalar, float student_temperature_scalar, int ignore_index, "
    "bool student_grad, bool teacher_grad) -> (Tensor row_loss, Tensor grad_student, "
    "Tensor grad_teacher)"
)
OP = "fastabsld::kd_kl_div_forward"
REDUCTIONS = ("none", "sum", "batchmean", "mean")
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------
# Argument checks of the public function (once per call; the kernels trust them).


def _check_logits(student_logits, teacher_logits):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (B, C), got shape {tuple(x.shape)}")
        if x.dtype not in LOGIT_DTYPES:
            raise ValueError(f"{name} must be fp32, fp16, bf16 or fp64, got {x.dtype}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if student_logits.shape[1] < 1:
        raise ValueError(f"the logits need at least one class, got shape {tuple(student_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits ({student_logits.device}) and teacher_logits "
                         f"({teacher_logits.device}) must be on one device")


def _check_labels(labels, batch, device):
    if labels is None:
        return None
    if not is_integer_tensor(labels):
        raise ValueError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got shape {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels ({labels.device}) must be on the logits' device ({device})")
    return labels if labels.dtype == torch.int64 else labels.long()


def _check_temperature(value, name, labels, batch, num_classes, device, dtype):
    """Splits a temperature into the op's (tensor or None, scalar) pair."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_complex or not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} must not require grad: the loss gives no temperature gradient")
        length = num_classes if labels is not None else batch
        if value.dim() == 0:
            return value.to(device, dtype).reshape(1).expand(length), 1.0
        if value.dim() != 1 or value.shape[0] != length:
            kind = f"C={num_classes} (with labels)" if labels is not None else f"B={batch} (without labels)"
            raise ValueError(f"{name} must be a number, a 0-d tensor or a 1-D tensor of length {kind}, "
                             f"got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} ({value.device}) must be on the logits' device ({device})")
        return (value if value.dtype == dtype else value.to(dtype)), 1.0
    return None, check_real(value, name, minimum=0.0, strict=True)


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


def _check_values(labels, temperatures, ignore_index, num_classes):
    """The kernels' value checks (the C++ TORCH_CHECK, the Triton device assert), done eagerly on CPU tensors.

    A label must lie in [0, C) or equal ``ignore_index``; the temperatures that counted rows use
    must be positive and finite.
    """
    kept = None
    if labels is not None:
        kept = labels != ignore_index
        used = labels[kept]
        if bool(((used < 0) | (used >= num_classes)).any()):
            raise RuntimeError(f"kd_kl_div_forward: labels must lie in [0, C={num_classes}) or equal "
                               f"ignore_index={ignore_index}")
    for name, tau in temperatures:
        if tau is None:
            continue
        used = tau[labels[kept]] if labels is not None else tau
        if not bool(((used > 0) & torch.isfinite(used)).all()):
            raise RuntimeError(f"kd_kl_div_forward: {name} must be positive and finite where it is used")


def _row_temperatures(tensor, scalar, labels, compute, device):
    """(B, 1) per-row temperatures from a (C,)/(B,) tensor, or a 0-d tensor for the scalar."""
    if tensor is None:
        return torch.tensor(scalar, dtype=compute, device=device)
    if labels is not None:
        tensor = tensor[labels.clamp(0, tensor.shape[0] - 1)]  # ignored rows may hold any label
    return tensor.to(device, compute).reshape(-1, 1)


def fallback_forward(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                     teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad,
                     teacher_grad):
    """The op in plain PyTorch: the backend where no compiled kernel applies.

    Args and Returns: as ``torch.ops.fastabsld.kd_kl_div_forward`` (module docstring).
    """
    num_classes = student_logits.shape[1]
    if student_logits.device.type == "cpu":
        _check_values(labels, [("teacher_temperature", teacher_temperature),
                               ("student_temperature", student_temperature)], ignore_index, num_classes)
    for name, value in (("teacher_temperature", teacher_temperature_scalar),
                        ("student_temperature", student_temperature_scalar)):
        if not (0 < value < float("inf")):
            raise RuntimeError(f"kd_kl_div_forward: {name} must be positive and finite, got {value:.6g}")
    compute = accumulation_dtype(student_logits, teacher_logits)
    device = student_logits.device
    tau_t = _row_temperatures(teacher_temperature, teacher_temperature_scalar, labels, compute, device)
    tau_s = _row_temperatures(student_temperature, student_temperature_scalar, labels, compute, device)
    log_p = torch.log_softmax(teacher_logits.to(compute) / tau_t, dim=1)
    log_q = torch.log_softmax(student_logits.to(compute) / tau_s, dim=1)
    p = log_p.exp()
    zero = torch.zeros((), dtype=compute, device=device)
    diff = torch.where(p > 0, log_p, zero) - torch.where(p > 0, log_q, zero)  # 0 log 0 = 0
    rows = (p * diff).sum(dim=1)
    kept = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != ignore_index
    rows = torch.where(kept, rows, zero)
    kept = kept.unsqueeze(1)
    grad_s = student_logits.new_empty((0,))
    grad_t = teacher_logits.new_empty((0,))
    if student_grad:
        grad_s = torch.where(kept, (log_q.exp() - p) / tau_s, zero).to(student_logits.dtype)
    if teacher_grad:
        grad_t = torch.where(kept, p * (diff - rows.unsqueeze(1)) / tau_t, zero).to(teacher_logits.dtype)
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


def _cuda_forward(*args):
    launcher = triton_forward()
    if launcher is None or torch.float64 in (args[0].dtype, args[1].dtype):  # the Triton kernel has no fp64
        return fallback_forward(*args)
    return launcher(*args)


# ----------------------------------------------------------------------------------------------
# Registrations: the schema (when the extension is missing), the kernels, fake kernels, autograd.

if not HAS_EXTENSION:
    _LIB = torch.library.Library("fastabsld", "FRAGMENT")
    _LIB.define(SCHEMA)
    _LIB.impl("kd_kl_div_forward", fallback_forward, "CompositeExplicitAutograd")
_CUDA_LIB = torch.library.Library("fastabsld", "IMPL")
_CUDA_LIB.impl("kd_kl_div_forward", _cuda_forward, "CUDA")


@torch.library.register_fake(OP)
def _kd_kl_div_forward_fake(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                            teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad,
                            teacher_grad):
    batch, num_classes = student_logits.shape
    rows = student_logits.new_empty((batch,), dtype=accumulation_dtype(student_logits, teacher_logits))
    grad_s = student_logits.new_empty((batch, num_classes) if student_grad else (0,))
    grad_t = teacher_logits.new_empty((batch, num_classes) if teacher_grad else (0,))
    return rows, grad_s, grad_t


if HAS_EXTENSION:
    @torch.library.register_fake("fastabsld::kd_kl_div_loss")
    def _kd_kl_div_loss_fake(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                             teacher_temperature_scalar, student_temperature_scalar, ignore_index, reduction):
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


def _backward(ctx, grad_rows, _grad_gs, _grad_gt):
    grad_s, grad_t = ctx.saved_tensors
    if grad_rows is None:
        return (None,) * 10
    out_s = scale_rows(grad_s, grad_rows) if ctx.student_grad else None
    out_t = scale_rows(grad_t, grad_rows) if ctx.teacher_grad else None
    return (out_s, out_t) + (None,) * 8


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# The reduction of the traced path, and the choice between the eager and the traced path.


def _row_denominator(reduction, labels, ignore_index, batch, num_classes):
    """What the sum of row losses is divided by: None, a number, or a 0-d tensor (no host sync)."""
    if reduction in ("none", "sum"):
        return None
    per_row = num_classes if reduction == "mean" else 1
    if labels is None:
        return float(batch * per_row)
    count = (labels != ignore_index).sum()
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
        torch._C._len_torch_dispatch_stack() == 0 and not torch._C._are_functorch_transforms_active()


# ----------------------------------------------------------------------------------------------
# Public functions.


def kd_kl_div_forward(student_logits, teacher_logits, labels=None, teacher_temperature=None,
                      student_temperature=None, teacher_temperature_scalar=1.0, student_temperature_scalar=1.0,
                      ignore_index=-100, student_grad=True, teacher_grad=False):
    """Per-row KD loss and its gradients in one pass (``torch.ops.fastabsld.kd_kl_div_forward``).

    Differentiable through ``row_loss`` in the logits whose ``*_grad`` flag is set. A thin call of
    the op: the arguments are the op's (see the module docstring), checked by its kernels.

    Args:
        student_logits: (B, C) fp32/fp16/bf16/fp64, any strides.
        teacher_logits: (B, C), same choice of dtypes (may differ from the student's).
        labels: (B,) int64 or None.
        teacher_temperature: fp32 (C,) with labels, (B,) without, or None for the scalar.
        student_temperature: likewise.
        teacher_temperature_scalar: the teacher's temperature where the tensor is None.
        student_temperature_scalar: the student's temperature where the tensor is None.
        ignore_index: label of rows that give 0 and zero gradients.
        student_grad: compute and store d row_loss / d student_logits.
        teacher_grad: compute and store d row_loss / d teacher_logits.

    Returns:
        tuple: (row_loss (B,), grad_student (B, C) or (0,), grad_teacher (B, C) or (0,)).
    """
    return torch.ops.fastabsld.kd_kl_div_forward(
        student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
        float(teacher_temperature_scalar), float(student_temperature_scalar), int(ignore_index),
        bool(student_grad), bool(teacher_grad))


def kd_kl_div(student_logits, teacher_logits, *, labels=None, teacher_temperature=1.0, student_temperature=1.0,
              reduction="batchmean", ignore_index=-100):
    """KL divergence from the tempered teacher's to the tempered student's softmax, fused.

    Per row i: ``KL(softmax(t_i / tau_t) || softmax(s_i / tau_s))`` with 0 log 0 = 0 (a teacher
    logit of -inf rules a class out), computed with its gradient in one pass (fp32 accumulation;
    fp64 for fp64 logits). Gradients flow to the logits that require grad, in their dtypes;
    temperatures receive none.

    Args:
        student_logits: (B, C) logits, fp32/fp16/bf16 (fp64 on the CPU), any strides.
        teacher_logits: (B, C) logits; its dtype may differ from the student's.
        labels: (B,) integer labels or None. With labels, a 1-D temperature holds one value per
            class and row i uses ``temperature[labels[i]]``; rows labelled ``ignore_index`` are
            left out. Other labels must lie in [0, C).
        teacher_temperature: a positive finite number, a 0-d tensor, or a 1-D tensor of length C
            (with labels) or B (without).
        student_temperature: likewise.
        reduction: "none" (per-row loss, shape (B,)), "sum", "batchmean" (sum / counted rows) or
            "mean" (sum / (counted rows * C), the per-element mean of the released ABSLD code).
        ignore_index: label of rows that contribute nothing and are not counted.

    Returns:
        Tensor: the loss, fp32 (fp64 for fp64 logits); shape (B,) for "none", else 0-d.

    Raises:
        ValueError: bad shapes, dtypes, devices, reduction, or a non-positive/non-finite number
            temperature. A label outside [0, C) or a bad value inside a temperature tensor is a
            RuntimeError from the kernel (on CUDA, a device-side assert).
    """
    _check_logits(student_logits, teacher_logits)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    ignore_index = check_int(ignore_index, "ignore_index")
    batch, num_classes = student_logits.shape
    device = student_logits.device
    labels = _check_labels(labels, batch, device)
    tau_dtype = accumulation_dtype(student_logits, teacher_logits)
    tau_t, tau_t_scalar = _check_temperature(teacher_temperature, "teacher_temperature", labels, batch,
                                             num_classes, device, tau_dtype)
    tau_s, tau_s_scalar = _check_temperature(student_temperature, "student_temperature", labels, batch,
                                             num_classes, device, tau_dtype)
    args = (student_logits, teacher_logits, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, ignore_index)
    if _eager_fast_path(student_logits, teacher_logits, labels, tau_t, tau_s):
        return torch.ops.fastabsld.kd_kl_div_loss(*args, reduction)
    denominator = _row_denominator(reduction, labels, ignore_index, batch, num_classes)
    grad_on = torch.is_grad_enabled()
    rows, _, _ = torch.ops.fastabsld.kd_kl_div_forward(
        *args, grad_on and student_logits.requires_grad, grad_on and teacher_logits.requires_grad)
    return _reduce(rows, reduction, denominator)
