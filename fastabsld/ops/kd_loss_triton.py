"""The KD loss on CUDA tensors through the Triton kernels: an eager host path that keeps up, and an
op that ``torch.compile`` sees into.

At ABSLD's shapes, (128, 10) and (128, 100), the kernels need a few microseconds of GPU time,
so the host decides the speed. :func:`eager_call`'s :class:`EagerCall` is what :func:`fastabsld.ops.kd_loss.kd_kl_div`
runs for plain CUDA tensors outside ``torch.compile``:

* the launch plan is cached per (shape, strides, dtypes, 16-byte alignment, flags, device) in
  ``fastabsld.kernels.kd_kl_div``, and after its first launch each kernel is launched straight
  through its compiled launcher (no argument binding or specialisation per call);
* numbers stay Python numbers (kernel arguments): nothing is copied to the device, nothing
  waits for it, and a CUDA graph can capture the call;
* the reduction runs on the device: the row kernel (tile form; statistics and finish kernels for
  the split form) and one finishing kernel that sums the rows, counts the kept ones and divides,
  and writes the factor the backward needs. The backward is one launch, the stored gradient
  times grad_output times that factor;
* outputs are allocated with ``new_empty`` and integer sizes (the cheapest allocation call), the
  backward's factor in the row buffer's last value;
* the loss's autograd node is the extension's ``attach_backward`` (``csrc/python_backward.cpp``):
  a C++ node that calls the Python backward, at a fraction of ``torch.autograd.Function``'s cost
  (the Function remains for builds without the extension). The node holds the stored gradient
  itself, not as a saved tensor, so ``saved_tensors_hooks`` (offloading to the CPU, activation
  checkpointing) leave it where it is;
* :class:`EagerCall` holds what a call's metadata decides (plan, gradient flags), so that the
  public function, which remembers checked calls by signature, goes straight to it.

fp16 logits keep their stored gradient in fp32 until the backward has scaled it by grad_output
(a loss scaler's factor, or 1 / (rows * C)): at C = 32000 most entries of q - p lie below
fp16's smallest normal, and storing them in fp16 first would lose them.

A backward run with grad enabled (``create_graph=True``) recomputes through the op's traced path
(``torch.ops.fastabsld.kd_kl_div_forward`` and its registered autograd), so derivatives of a
derivative are those of that op.

Under ``torch.compile`` the loss on CUDA tensors traces ``torch.ops.fastabsld.kd_kl_div_forward_triton``
(:func:`traced_op`): the same schema as ``kd_kl_div_forward``, defined with
``torch.library.triton_op`` and launching its kernels through ``torch.library.wrap_triton``, so
that AOTAutograd decomposes it into the Triton kernel calls themselves. Inductor then launches
the kernels from its generated code (no Python planner per call) and ``mode="reduce-overhead"``
captures them in a CUDA graph. Its autograd is the forward op's (registered in ``kd_loss``).
"""

import importlib
from typing import Optional

import torch
from torch.autograd import forward_ad

from fastabsld.ops._extension import HAS_EXTENSION
from fastabsld.ops._kernels import HAS_TRITON

# Device types whose tensors take this path. ``benchmarks/kd_host_cost.py`` adds "cpu" to time
# the path's host work on CPU tensors, with Triton's launches recorded instead of made.
EAGER_DEVICES = {"cuda"}
# Device types whose tensors trace the Triton op under torch.compile (a test adds "cpu").
TRACED_DEVICES = {"cuda"}
TRITON_OP = "fastabsld::kd_kl_div_forward_triton"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The grad_fn name of the eager loss.
BACKWARD_NAME = "KdKlDivBackward"


def _attach_backward():
    if not HAS_EXTENSION:
        return None
    from fastabsld import _C
    return getattr(_C, "attach_backward", None)


# The extension's cheap autograd node for the eager loss (None without it: a torch.autograd.Function).
_ATTACH_BACKWARD = _attach_backward()


def _import_kernels():
    if not HAS_TRITON:
        return None
    try:
        return importlib.import_module("fastabsld.kernels.kd_kl_div")
    except ImportError:
        return None


# Imported once here, not on first use: torch.compile traces the functions that read it.
_KERNELS = _import_kernels()


def kernels():
    """The Triton kernel module ``fastabsld.kernels.kd_kl_div``, or None without triton.

    Returns:
        module or None.
    """
    return _KERNELS


def applies(student_logits, teacher_logits, labels, tau_t, tau_s, weight, sample_weight):
    """Whether a call of the public loss with these (checked) arguments takes this path.

    Plain tensors on a device in ``EAGER_DEVICES``, outside tracing, dispatch modes, functorch
    transforms and forward-mode AD; dtypes and temperature kinds the Triton kernels implement.

    Returns:
        bool.
    """
    if student_logits.device.type not in EAGER_DEVICES or torch.compiler.is_compiling():
        return False
    if student_logits.dtype not in TRITON_DTYPES or teacher_logits.dtype not in TRITON_DTYPES:
        return False
    for tau in (tau_t, tau_s):  # per-row temperatures (B, 1) only without labels
        if tau is not None and tau.dim() == 2 and labels is not None:
            return False
    if kernels() is None or torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active() \
            or forward_ad._current_level >= 0:
        return False
    for tensor in (student_logits, teacher_logits, labels, tau_t, tau_s, weight, sample_weight):
        if tensor is not None and type(tensor) is not torch.Tensor:  # subclasses and wrappers trace instead
            return False
    return True


def _launcher_tensor(value):
    """A checked temperature or weight tensor in the launcher's terms: (B, 1) -> (B,), fp32, contiguous
    (a 0-d tensor on the device arrives as a stride-0 view of its value)."""
    if value is None:
        return None
    if value.dim() == 2:
        value = value.reshape(-1)
    return value.to(torch.float32).contiguous()


def _grad_dtype(dtype):
    return torch.float32 if dtype == torch.float16 else dtype


class EagerCall:
    """The eager Triton loss of calls with one metadata: their plan, gradient flags and reduction.

    Built once per metadata (:func:`eager_call`); calling it allocates the outputs, launches and,
    when a gradient is wanted, gives the loss its autograd node (``fastabsld._C.attach_backward``,
    or a ``torch.autograd.Function`` without the extension). ``cacheable`` says whether the
    tensors go to the kernels as given (no per-call conversion), so that a later call with the
    same metadata may reuse it.

    Args of a call: the checked arguments of ``torch.ops.fastabsld.kd_kl_div_loss`` (for which
    :func:`applies` is true) without ``ignore_index`` and ``reduction``, which the call fixes.

    Returns of a call: the loss, fp32: (B,) for "none", else 0-d.
    """

    __slots__ = ("plan", "grad", "student_grad", "teacher_grad", "reduction", "ignore_index", "traced", "cacheable")

    def __init__(self, plan, student_grad, teacher_grad, reduction, ignore_index, traced, cacheable):
        self.plan = plan
        self.student_grad = student_grad
        self.teacher_grad = teacher_grad
        self.grad = student_grad or teacher_grad
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.traced = traced
        self.cacheable = cacheable

    def __call__(self, student_logits, teacher_logits, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar,
                 weight, sample_weight, sample_weight_scalar):
        arguments = (labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, weight, sample_weight, sample_weight_scalar)
        if self.grad and _ATTACH_BACKWARD is None:
            return _KdLoss.apply(student_logits, teacher_logits, self, arguments)
        loss, grad_s, grad_t, scale = self.plan.run(
            student_logits, teacher_logits, *(arguments if self.cacheable else _launcher_arguments(arguments)))
        if self.grad:
            _ATTACH_BACKWARD(loss, student_logits, teacher_logits,
                             _Backward(self, arguments, grad_s, grad_t, scale, student_logits, teacher_logits),
                             BACKWARD_NAME)
        return loss


def _launcher_arguments(arguments):
    """(labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, weight, sample_weight, sample_weight_scalar)
    with the tensors in the launcher's terms."""
    labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, weight, sample_weight, sample_weight_scalar = arguments
    return (labels, _launcher_tensor(tau_t), _launcher_tensor(tau_s), tau_t_scalar, tau_s_scalar,
            _launcher_tensor(weight), _launcher_tensor(sample_weight), sample_weight_scalar)


class _Backward:
    """The backward of one eager call: the stored gradients times the incoming gradient (one
    launch each), or, in a backward that is itself differentiated, the traced path's.

    The stored gradients and the scale are the call's own buffers, which nothing else can modify:
    they are kept as they are (``save_for_backward``'s bookkeeping is a measurable part of the call
    at small shapes). The logits, read again only by a backward with ``create_graph``, are kept
    with their version counters, which that backward checks as ``save_for_backward`` would.

    Args of a call: the loss's incoming gradient, whether the student's and the teacher's
    gradients are needed.

    Returns of a call: (the student's gradient or None, the teacher's or None).
    """

    __slots__ = ("call", "arguments", "grad_s", "grad_t", "scale", "student_logits", "teacher_logits", "versions")

    def __init__(self, call, arguments, grad_s, grad_t, scale, student_logits, teacher_logits):
        self.call = call
        self.arguments = arguments
        self.grad_s = grad_s
        self.grad_t = grad_t
        self.scale = scale
        self.student_logits = student_logits
        self.teacher_logits = teacher_logits
        self.versions = (student_logits._version, teacher_logits._version)

    def __call__(self, grad, student_grad, teacher_grad):
        student_logits, teacher_logits = self.student_logits, self.teacher_logits
        if torch.is_grad_enabled():
            for name, tensor, version in (("student_logits", student_logits, self.versions[0]),
                                          ("teacher_logits", teacher_logits, self.versions[1])):
                if tensor._version != version:
                    raise RuntimeError(
                        f"kd_kl_div: {name} was modified by an inplace operation after the loss was computed "
                        f"(version {version}, now {tensor._version}); a backward with create_graph=True needs it "
                        "as it was")
            return _differentiable_backward(student_logits, teacher_logits, self.call, self.arguments, grad,
                                            student_grad, teacher_grad)
        scale_gradient = kernels().scale_gradient
        return (scale_gradient(self.grad_s, grad, self.scale, student_logits.dtype) if student_grad else None,
                scale_gradient(self.grad_t, grad, self.scale, teacher_logits.dtype) if teacher_grad else None)


class _KdLoss(torch.autograd.Function):
    """The eager loss's autograd where the extension (``attach_backward``) is missing; its saved
    tensors give the usual checks (a second backward, logits changed in place)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, call, arguments):
        loss, grad_s, grad_t, scale = call.plan.run(
            student_logits, teacher_logits, *(arguments if call.cacheable else _launcher_arguments(arguments)))
        ctx.save_for_backward(grad_s, grad_t, scale, student_logits, teacher_logits)
        ctx.call_and_arguments = call, arguments
        return loss

    @staticmethod
    def backward(ctx, grad):
        backward = _Backward(*ctx.call_and_arguments, *ctx.saved_tensors)
        return backward(grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1]) + (None, None)


def _differentiable_backward(student_logits, teacher_logits, call, arguments, grad, student_grad, teacher_grad):
    """The backward through ``call.traced`` (the public loss's traced path: the forward op and its
    registered autograd), for a backward that is itself differentiated."""
    inputs = [x for x, wanted in ((student_logits, student_grad), (teacher_logits, teacher_grad)) if wanted]
    labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, weight, sample_weight, sample_weight_scalar = arguments
    loss = call.traced(student_logits, teacher_logits, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar,
                       call.ignore_index, call.reduction, weight, sample_weight, sample_weight_scalar)
    grads = iter(torch.autograd.grad(loss, inputs, grad, create_graph=True))
    return (next(grads) if student_grad else None), (next(grads) if teacher_grad else None)


def eager_call(student_logits, teacher_logits, labels, tau_t, tau_s, ignore_index, reduction, weight, sample_weight,
               traced):
    """The :class:`EagerCall` for checked arguments with this metadata, on which :func:`applies` is true.

    Args:
        student_logits, teacher_logits, labels, tau_t, tau_s, ignore_index, reduction, weight,
        sample_weight: as for ``torch.ops.fastabsld.kd_kl_div_loss``, checked by the public
            function: (B, C) logits, int64 labels or None, temperatures (C,) with labels or (B, 1)
            without, or None for the numbers; weights (C,), (B,) or None. Tensors are read for
            their metadata only.
        traced: the same loss through the traced path (``kd_loss``'s ``_traced_loss``, same
            arguments as the op), which a backward run with ``create_graph`` differentiates.

    Returns:
        EagerCall.
    """
    grad_on = torch.is_grad_enabled()
    student_grad = grad_on and student_logits.requires_grad
    teacher_grad = grad_on and teacher_logits.requires_grad
    given = (tau_t, tau_s, weight, sample_weight)
    launched = tuple(_launcher_tensor(x) for x in given)
    plan = kernels().eager_plan(student_logits, teacher_logits, labels, *launched, ignore_index,
                                student_grad, teacher_grad, reduction,
                                (_grad_dtype(student_logits.dtype), _grad_dtype(teacher_logits.dtype)))
    cacheable = all(x is y for x, y in zip(given, launched))
    return EagerCall(plan, student_grad, teacher_grad, reduction, ignore_index, traced, cacheable)


def _launch_traceable(launch):
    """Runs one planned launch through ``wrap_triton``: a plain launch in eager mode, a kernel call
    that AOTAutograd records (and Inductor launches) under tracing."""
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    if launch.debug:
        options["debug"] = True
    if launch.maxnreg is not None:  # the split form's grid assumes its register cap
        options["maxnreg"] = launch.maxnreg
    torch.library.wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.constexprs, **options)


if HAS_TRITON:  # triton_op and wrap_triton need triton
    @torch.library.triton_op(TRITON_OP, mutates_args=())
    def kd_kl_div_forward_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                                 teacher_temperature: Optional[torch.Tensor], student_temperature: Optional[torch.Tensor],
                                 teacher_temperature_scalar: float, student_temperature_scalar: float, ignore_index: int,
                                 student_grad: bool, teacher_grad: bool, weight: Optional[torch.Tensor] = None,
                                 sample_weight: Optional[torch.Tensor] = None,
                                 sample_weight_scalar: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``kd_kl_div_forward`` as a Triton op: the same arguments and outputs, for tracing.

        The calls :func:`traced_op` picks it for are those :func:`applies` allows (Triton dtypes,
        per-row temperatures only without labels). fp16 logits get their stored gradient in fp32 (the
        registered backward scales it by grad_output in fp32; autograd rounds the result to fp16).

        Args and Returns: as ``torch.ops.fastabsld.kd_kl_div_forward``.
        """
        kd = kernels()
        outputs, launches = kd.plan(
            student_logits, teacher_logits, labels, _launcher_tensor(teacher_temperature),
            _launcher_tensor(student_temperature), teacher_temperature_scalar, student_temperature_scalar, ignore_index,
            student_grad, teacher_grad, weight=_launcher_tensor(weight), sample_weight=_launcher_tensor(sample_weight),
            sample_weight_scalar=sample_weight_scalar,
            grad_dtypes=(_grad_dtype(student_logits.dtype), _grad_dtype(teacher_logits.dtype)))
        for launch in launches:
            _launch_traceable(launch)
        return outputs


def traced_op(student_logits, teacher_logits, labels, tau_t, tau_s):
    """The forward op the traced path of the public loss calls.

    Under ``torch.compile``, for tensors on a device in ``TRACED_DEVICES`` and a call the Triton
    kernels implement: ``kd_kl_div_forward_triton``; otherwise ``kd_kl_div_forward``.

    Returns:
        an OpOverloadPacket with ``kd_kl_div_forward``'s schema.
    """
    if student_logits.device.type in TRACED_DEVICES and torch.compiler.is_compiling() and kernels() is not None \
            and student_logits.dtype in TRITON_DTYPES and teacher_logits.dtype in TRITON_DTYPES \
            and not any(tau is not None and tau.dim() == 2 and labels is not None for tau in (tau_t, tau_s)):
        return torch.ops.fastabsld.kd_kl_div_forward_triton
    return torch.ops.fastabsld.kd_kl_div_forward



def device_asserts():
    """Whether the Triton kernels compile their device asserts in (``fastabsld.kernels.kd_kl_div``'s
    ``DEVICE_ASSERTS``; False without triton): part of what a remembered call's plan depends on.

    Returns:
        bool.
    """
    return _KERNELS is not None and _KERNELS.DEVICE_ASSERTS
