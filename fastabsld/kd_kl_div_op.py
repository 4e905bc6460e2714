"""The fused KD loss as the custom op ``torch.ops.fastabsld.kd_kl_div_forward``.

Per row i (s, t: the student's and teacher's logits; C columns), with p = softmax(t / tau_t)
and q = softmax(s / tau_s) computed in fp32 (fp64 for fp64 logits), the op returns

* ``row_loss[i] = sum_c p_c (log p_c - log q_c)`` (0 log 0 = 0), shape (B,), fp32 (fp64);
* ``grad_student[i] = (q - p) / tau_s`` in the student's dtype, or an empty (0,) tensor;
* ``grad_teacher[i] = p * ((log p - log q) - row_loss[i]) / tau_t`` in the teacher's dtype, or
  an empty (0,) tensor.

A temperature tensor (fp32) holds one value per class (indexed by ``labels``) or, without
labels, one per row; the scalar is used where the tensor is None. Rows labelled
``ignore_index`` give 0 and zero gradients.

Backends: the C++ kernel (``csrc/kd_kl_div_cpu.cpp``) on CPU tensors; the Triton kernel
(``fastabsld.kernels.kd_kl_div``) on CUDA tensors when it can be imported; the reference
(``fastabsld.reference.kd_kl_div``) otherwise. The op's autograd only scales the stored
gradients by the incoming gradient of ``row_loss``.

With the extension, ``torch.ops.fastabsld.kd_kl_div_loss`` (``csrc/kd_kl_div_loss.cpp``) is the
same op plus the reduction, with its autograd in C++: the eager path of ``fastabsld.loss``.
"""

import functools
import importlib

import torch

from fastabsld import reference
from fastabsld._extension import HAS_EXTENSION

SCHEMA = (
    "kd_kl_div_forward(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
    "Tensor? teacher_temperature, Tensor? student_temperature, "
    "float teacher_temperature_scalar, float student_temperature_scalar, int ignore_index, "
    "bool student_grad, bool teacher_grad) -> (Tensor row_loss, Tensor grad_student, "
    "Tensor grad_teacher)"
)

OP = "fastabsld::kd_kl_div_forward"


def accumulation_dtype(student_logits, teacher_logits):
    """The dtype the op computes and returns ``row_loss`` in.

    Args:
        student_logits: the student's logits.
        teacher_logits: the teacher's logits.

    Returns:
        torch.dtype: fp64 when either input is fp64, else fp32.
    """
    return torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32


def reference_forward(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                      teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad,
                      teacher_grad):
    """The op from ``fastabsld.reference`` (the fallback backend).

    The row losses are ``reference.kd_kl_div``'s; the gradients follow the contract's formulas
    on the reference's probabilities (autograd is not available here: an op's kernel runs below
    the autograd dispatch).

    Args and Returns: as ``torch.ops.fastabsld.kd_kl_div_forward`` (module docstring).
    """
    batch, num_classes = student_logits.shape
    if student_logits.device.type == "cpu":
        reference.check_kd_values(labels, [("teacher_temperature", teacher_temperature),
                                           ("student_temperature", student_temperature)], ignore_index, num_classes)
    for name, value in (("teacher_temperature", teacher_temperature_scalar),
                        ("student_temperature", student_temperature_scalar)):
        if not (0 < value < float("inf")):
            raise RuntimeError(f"kd_kl_div_forward: {name} must be positive and finite, got {value}")
    compute = accumulation_dtype(student_logits, teacher_logits)
    tau_t = teacher_temperature_scalar if teacher_temperature is None else teacher_temperature
    tau_s = student_temperature_scalar if student_temperature is None else student_temperature
    rows = reference.kd_kl_div(student_logits, teacher_logits, labels, tau_t, tau_s, "none", ignore_index)
    rows = rows.to(compute)
    grad_s = student_logits.new_empty((0,))
    grad_t = teacher_logits.new_empty((0,))
    if student_grad or teacher_grad:
        def per_row(tau):
            tau = reference.row_temperature(tau, labels, batch, num_classes).to(student_logits.device, compute)
            return tau.reshape(-1, 1) if tau.dim() else tau

        tau_t, tau_s = per_row(tau_t), per_row(tau_s)
        log_p = torch.log_softmax(teacher_logits.to(compute) / tau_t, dim=1)
        log_q = torch.log_softmax(student_logits.to(compute) / tau_s, dim=1)
        p = log_p.exp()
        kept = torch.ones_like(rows) if labels is None else (labels != ignore_index).to(compute)
        kept = kept.unsqueeze(1)
        if student_grad:
            grad_s = ((log_q.exp() - p) / tau_s * kept).to(student_logits.dtype)
        if teacher_grad:
            diff = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=compute, device=p.device))
            grad_t = (p * (diff - rows.unsqueeze(1)) / tau_t * kept).to(teacher_logits.dtype)
    return rows, grad_s.contiguous(), grad_t.contiguous()


@functools.cache
def triton_forward():
    """The Triton launcher ``fastabsld.kernels.kd_kl_div.kd_kl_div_forward``, or None.

    Returns:
        callable or None: None when triton or the kernel module cannot be imported.
    """
    try:
        return importlib.import_module("fastabsld.kernels.kd_kl_div").kd_kl_div_forward
    except ImportError:
        return None


def _cuda_forward(*args):
    launcher = triton_forward()
    if launcher is None or torch.float64 in (args[0].dtype, args[1].dtype):  # the Triton kernel has no fp64
        return reference_forward(*args)
    return launcher(*args)


if not HAS_EXTENSION:
    _LIB = torch.library.Library("fastabsld", "FRAGMENT")
    _LIB.define(SCHEMA)
    _LIB.impl("kd_kl_div_forward", reference_forward, "CompositeExplicitAutograd")
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
    """``grad`` (B, C) scaled per row by ``grad_rows`` ((B,), any strides), in ``grad``'s dtype."""
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


def kd_kl_div_forward(student_logits, teacher_logits, labels=None, teacher_temperature=None,
                      student_temperature=None, teacher_temperature_scalar=1.0, student_temperature_scalar=1.0,
                      ignore_index=-100, student_grad=True, teacher_grad=False):
    """Per-row KD loss and its gradients in one pass (``torch.ops.fastabsld.kd_kl_div_forward``).

    Differentiable through ``row_loss`` in the logits whose ``*_grad`` flag is set.

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
