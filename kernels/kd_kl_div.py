"""Fused temperature-scaled KD loss forward in Triton: row KL and its gradients in one pass.

Per row i: p = softmax(t_i / tau_t), q = softmax(s_i / tau_s), row_loss = KL(p || q) with
0 log 0 = 0, grad_student = (q - p) / tau_s, grad_teacher = p * ((log p - log q) - KL) / tau_t.
Temperatures are one scalar, one per class (gathered by the row's label) or one per row.
The semantics are fixed by the shared contract of ``torch.ops.fastabsld.kd_kl_div_forward``.

One kernel, ``_kd_kl_div_kernel``, in two forms (the constexpr ONLINE):

* tile (C <= ONLINE_THRESHOLD): a tile of BLOCK_M rows x next_pow2(C) columns
  stays in registers; s and t are read once and each requested gradient written once.
* online (larger C, LLM vocabularies): an online softmax over column blocks.
  Pass 1 keeps the running max and sum-exp of both distributions and the running
  sum of exp(a - m_t) * (a - b) (a = t / tau_t, b = s / tau_s), rescaled when a max grows;
  pass 2 (only when a gradient is asked for) re-reads s and t and writes the gradients.
  Probabilities are never stored.

Memory traffic per element (e_s, e_t: bytes of the student's and teacher's dtype): the tile
form reads e_s + e_t and writes e_s (student gradient) and/or e_t (teacher gradient), the
ideal (fp32: 12 B, bf16: 6 B with the student gradient); ignored rows read nothing. The
online form reads e_s + e_t twice when a gradient is asked for (fp32: 20 B, bf16: 10 B; the
second read comes from L2 while the rows in flight fit in it), once when not. Per row: the
label, the temperatures and the loss (about 16 B).

Math is fp32 whatever the input dtype; gradients are stored in their logits' dtype.
The temperature modes, the labels' presence and the gradient flags are runtime arguments
(uniform branches and per-row scalar work, nothing per element), excluded from Triton's
value specialisation: the compiled variants are only form x (student, teacher) dtypes.
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

# Above this many columns the online kernel runs: a row of the tile kernel is held in
# registers, and at 8192 fp32 values for each of s and t a 16-warp CTA (512 threads)
# already keeps 16 values of each per thread plus temporaries; 16384 would spill.
ONLINE_THRESHOLD = 8192
# Elements of one tile of the tile kernel (rows x padded columns) and per warp.
TILE_ELEMENTS = 4096
ELEMENTS_PER_WARP = 512
MAX_WARPS = 16
# Columns per step of the online kernel and its warps (16 fp32 values per thread per input).
ONLINE_BLOCK_N = 4096
ONLINE_WARPS = 8

SCALAR, BY_LABEL, BY_ROW = 0, 1, 2
# Integer arguments that Triton must not specialise on (value 1, divisibility by 16).
RUNTIME_FLAGS = ("B", "stride_l", "tau_t_mode", "tau_s_mode", "has_labels", "ignore_index", "student_grad",
                 "teacher_grad")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _temperature(tau_ptr, tau_scalar, tau_mode, label, rows64, usable):
    """Each row's temperature: the scalar, tau[label] or tau[row] (by ``tau_mode``)."""
    index = tl.where(tau_mode == 1, label, rows64)
    return tl.load(tau_ptr + index, mask=usable & (tau_mode != 0), other=tau_scalar)


@triton.jit
def _row_setup(labels_ptr, stride_l, tau_t_ptr, tau_s_ptr, tau_t_scalar, tau_s_scalar, tau_t_mode, tau_s_mode,
               has_labels, ignore_index, rows, row_mask, C):
    """Per-row flags and inverse temperatures.

    Returns keep (row exists and is not ignored), bad (kept row with a label out of range or a
    temperature that is not positive and finite: its outputs become NaN, and with device
    asserts compiled in, the launch fails), 1/tau_t and 1/tau_s (1 for rows not kept or bad).
    """
    rows64 = rows.to(tl.int64)
    label = tl.load(labels_ptr + rows64 * stride_l, mask=row_mask & (has_labels != 0), other=0)
    keep = row_mask & ((has_labels == 0) | (label != ignore_index))
    label_ok = (label >= 0) & (label < C)
    tl.device_assert(label_ok | ~keep, "kd_kl_div: a label is outside [0, C) and is not ignore_index")
    usable = keep & label_ok
    tau_t = _temperature(tau_t_ptr, tau_t_scalar, tau_t_mode, label, rows64, usable)
    tau_s = _temperature(tau_s_ptr, tau_s_scalar, tau_s_mode, label, rows64, usable)
    tau_ok = (tau_t > 0) & (tau_t < float("inf")) & (tau_s > 0) & (tau_s < float("inf"))
    tl.device_assert(tau_ok | ~usable, "kd_kl_div: a temperature is not positive and finite")
    valid = usable & tau_ok
    inv_t = 1.0 / tl.where(valid, tau_t, 1.0)
    inv_s = 1.0 / tl.where(valid, tau_s, 1.0)
    return keep, keep & ~valid, inv_t, inv_s


@triton.jit
def _finish_rows(values, keep, bad):
    """Zero for rows not kept, NaN for bad rows (flags shaped to broadcast against ``values``)."""
    return tl.where(bad, float("nan"), tl.where(keep, values, 0.0))


@triton.jit
def _store_grads(gs_ptr, gt_ptr, offsets, mask, log_p, log_q, loss, inv_t, inv_s, keep, bad, student_grad,
                 teacher_grad):
    """Writes (q - p) / tau_s and p * ((log p - log q) - loss) / tau_t for a tile, as asked."""
    p = tl.exp(log_p)
    if student_grad != 0:
        grad = (tl.exp(log_q) - p) * inv_s[:, None]
        tl.store(gs_ptr + offsets, _finish_rows(grad, keep[:, None], bad[:, None]).to(gs_ptr.dtype.element_ty), mask=mask)
    if teacher_grad != 0:
        support = p > 0
        diff = tl.where(support, log_p, 0.0) - tl.where(support, log_q, 0.0)
        grad = tl.where(support, p * (diff - loss[:, None]), 0.0) * inv_t[:, None]
        tl.store(gt_ptr + offsets, _finish_rows(grad, keep[:, None], bad[:, None]).to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_scaled(ptr, rows64, stride_b, cols64, stride_c, mask, fill, inv_tau):
    """Loads a tile of logits as fp32 and divides each row by its temperature."""
    x = tl.load(ptr + rows64[:, None] * stride_b + cols64[None, :] * stride_c, mask=mask, other=fill)
    return x.to(tl.float32) * inv_tau[:, None]


@triton.jit
def _online_statistics(s_ptr, t_ptr, rows64, C, stride_sb, stride_sc, stride_tb, stride_tc, keep, fill, inv_t, inv_s,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pass 1 of the online kernel: returns max_t, max_s, log sum-exp_t, log sum-exp_s and the row KL."""
    neg_inf = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_t = neg_inf
    m_s = neg_inf
    z_t = tl.zeros([BLOCK_M], tl.float32)
    z_s = tl.zeros([BLOCK_M], tl.float32)
    # sum over columns of exp(a - m_t) * (a - b) where both are finite
    cross = tl.zeros([BLOCK_M], tl.float32)
    # largest a where the student's b is -inf: KL = inf when its probability is not 0
    a_at_student_inf = neg_inf
    for start in range(0, C, BLOCK_N):
        cols64 = start + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = keep[:, None] & (cols64 < C)[None, :]
        a = _load_scaled(t_ptr, rows64, stride_tb, cols64, stride_tc, mask, fill, inv_t)
        b = _load_scaled(s_ptr, rows64, stride_sb, cols64, stride_sc, mask, fill, inv_s)
        m_t_new = tl.maximum(m_t, tl.max(a, 1))
        m_s_new = tl.maximum(m_s, tl.max(b, 1))
        # a max that is still -inf shifts by 0 instead (avoids -inf - -inf)
        m_t_safe = tl.where(m_t_new == float("-inf"), 0.0, m_t_new)
        m_s_safe = tl.where(m_s_new == float("-inf"), 0.0, m_s_new)
        alpha_t = tl.exp(m_t - m_t_safe)
        e_t = tl.exp(a - m_t_safe[:, None])
        z_t = z_t * alpha_t + tl.sum(e_t, 1)
        z_s = z_s * tl.exp(m_s - m_s_safe) + tl.sum(tl.exp(b - m_s_safe[:, None]), 1)
        in_support = e_t > 0
        finite_b = b > float("-inf")
        a_in = tl.where(in_support, a, 0.0)
        b_in = tl.where(in_support & finite_b, b, a_in)
        cross = cross * alpha_t + tl.sum(e_t * (a_in - b_in), 1)
        a_at_student_inf = tl.maximum(a_at_student_inf,
                                      tl.max(tl.where(in_support & ~finite_b, a, float("-inf")), 1))
        m_t = m_t_new
        m_s = m_s_new
    log_z_t = tl.log(z_t)
    log_z_s = tl.log(z_s)
    loss = cross / z_t - (m_t - m_s) - (log_z_t - log_z_s)
    p_at_student_inf = tl.exp((a_at_student_inf - m_t) - log_z_t)
    return m_t, m_s, log_z_t, log_z_s, tl.where(p_at_student_inf > 0, float("inf"), loss)


@triton.jit(do_not_specialize=RUNTIME_FLAGS)
def _kd_kl_div_kernel(s_ptr, t_ptr, labels_ptr, tau_t_ptr, tau_s_ptr, loss_ptr, gs_ptr, gt_ptr,
                      B, C, stride_sb, stride_sc, stride_tb, stride_tc, stride_l,
                      tau_t_scalar, tau_s_scalar, tau_t_mode, tau_s_mode, has_labels, ignore_index,
                      student_grad, teacher_grad,
                      ONLINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_M rows per program: one tile of BLOCK_N >= C columns, or (ONLINE) column blocks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    keep, bad, inv_t, inv_s = _row_setup(labels_ptr, stride_l, tau_t_ptr, tau_s_ptr, tau_t_scalar, tau_s_scalar,
                                         tau_t_mode, tau_s_mode, has_labels, ignore_index, rows, row_mask, C)
    rows64 = rows.to(tl.int64)
    # Padding columns of kept rows read -inf (probability 0); skipped rows read 0 (finite).
    fill = tl.where(keep, float("-inf"), 0.0)[:, None]
    if ONLINE:
        m_t, m_s, log_z_t, log_z_s, loss = _online_statistics(s_ptr, t_ptr, rows64, C, stride_sb, stride_sc,
                                                              stride_tb, stride_tc, keep, fill, inv_t, inv_s,
                                                              BLOCK_M, BLOCK_N)
        tl.store(loss_ptr + rows64, _finish_rows(loss, keep, bad), mask=row_mask)
        if (student_grad != 0) | (teacher_grad != 0):
            for start in range(0, C, BLOCK_N):
                cols64 = start + tl.arange(0, BLOCK_N).to(tl.int64)
                col_mask = (cols64 < C)[None, :]
                a = _load_scaled(t_ptr, rows64, stride_tb, cols64, stride_tc, keep[:, None] & col_mask, fill, inv_t)
                b = _load_scaled(s_ptr, rows64, stride_sb, cols64, stride_sc, keep[:, None] & col_mask, fill, inv_s)
                _store_grads(gs_ptr, gt_ptr, rows64[:, None] * C + cols64[None, :], row_mask[:, None] & col_mask,
                             (a - m_t[:, None]) - log_z_t[:, None], (b - m_s[:, None]) - log_z_s[:, None], loss,
                             inv_t, inv_s, keep, bad, student_grad, teacher_grad)
    else:
        cols64 = tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = (cols64 < C)[None, :]
        a = _load_scaled(t_ptr, rows64, stride_tb, cols64, stride_tc, keep[:, None] & col_mask, fill, inv_t)
        b = _load_scaled(s_ptr, rows64, stride_sb, cols64, stride_sc, keep[:, None] & col_mask, fill, inv_s)
        a_shift = a - tl.max(a, 1)[:, None]
        b_shift = b - tl.max(b, 1)[:, None]
        log_p = a_shift - tl.log(tl.sum(tl.exp(a_shift), 1))[:, None]
        log_q = b_shift - tl.log(tl.sum(tl.exp(b_shift), 1))[:, None]
        p = tl.exp(log_p)
        support = p > 0
        loss = tl.sum(p * (tl.where(support, log_p, 0.0) - tl.where(support, log_q, 0.0)), 1)
        tl.store(loss_ptr + rows64, _finish_rows(loss, keep, bad), mask=row_mask)
        _store_grads(gs_ptr, gt_ptr, rows64[:, None] * C + cols64[None, :], row_mask[:, None] & col_mask,
                     log_p, log_q, loss, inv_t, inv_s, keep, bad, student_grad, teacher_grad)


def tile_config(batch, num_classes):
    """Launch configuration of the tile kernel.

    A tile holds TILE_ELEMENTS (rows x padded columns, at least one row), with one warp per
    ELEMENTS_PER_WARP elements: 16 fp32 values of each input per thread.

    Args:
        batch: B.
        num_classes: C (at most ONLINE_THRESHOLD).

    Returns:
        dict: BLOCK_M, BLOCK_N, num_warps.
    """
    block_n = triton.next_power_of_2(num_classes)
    block_m = min(triton.next_power_of_2(batch), max(1, TILE_ELEMENTS // block_n))
    num_warps = min(MAX_WARPS, max(1, block_m * block_n // ELEMENTS_PER_WARP))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps}


def online_config(batch, num_classes):
    """Launch configuration of the online kernel: one row per program, ONLINE_BLOCK_N columns a step.

    Args:
        batch: B.
        num_classes: C.

    Returns:
        dict: BLOCK_M, BLOCK_N, num_warps.
    """
    del batch
    return {"BLOCK_M": 1, "BLOCK_N": min(ONLINE_BLOCK_N, triton.next_power_of_2(num_classes)),
            "num_warps": ONLINE_WARPS}


def _check_temperature(tensor, scalar, labels, batch, num_classes, device, name):
    """Validates one temperature argument's metadata (no device sync); returns (tensor, mode)."""
    if tensor is None:
        if not (math.isfinite(scalar) and scalar > 0):
            raise RuntimeError(f"kd_kl_div_forward: {name}_scalar must be positive and finite, got {scalar}")
        return None, SCALAR
    expected = num_classes if labels is not None else batch
    if tensor.dim() != 1 or tensor.shape[0] != expected:
        what = "C" if labels is not None else "B"
        raise ValueError(f"{name} must have shape ({what}={expected},), got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")
    return tensor.to(torch.float32).contiguous(), (BY_LABEL if labels is not None else BY_ROW)


def _check_values_eagerly(labels, temperatures, ignore_index, num_classes):
    """The device asserts' checks, done eagerly for CPU tensors (the interpreter has no device asserts)."""
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


def _check_inputs(student_logits, teacher_logits, labels):
    """Validates the logits and labels' metadata (no device sync)."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError("student_logits and teacher_logits must both have shape (B, C), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    for name, tensor in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if tensor.dtype not in DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16 for the Triton kernel, got {tensor.dtype}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits must be on {student_logits.device}, got {teacher_logits.device}")
    if student_logits.shape[1] < 1:
        raise ValueError(f"the logits need at least one column, got shape {tuple(student_logits.shape)}")
    if labels is not None:
        if labels.shape != (student_logits.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64 of shape (B={student_logits.shape[0]},), "
                             f"got {labels.dtype} of shape {tuple(labels.shape)}")
        if labels.device != student_logits.device:
            raise ValueError(f"labels must be on {student_logits.device}, got {labels.device}")


def kd_kl_div_forward(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                      teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad,
                      teacher_grad):
    """Row KL(softmax(t / tau_t) || softmax(s / tau_s)) and its gradients, by the Triton kernels.

    The implementation of ``torch.ops.fastabsld.kd_kl_div_forward`` on CUDA tensors (and on CPU
    tensors under the Triton interpreter). Picks the tile kernel for C <= ONLINE_THRESHOLD and
    the online kernel above.

    Args:
        student_logits: (B, C) fp32/fp16/bf16, any strides.
        teacher_logits: (B, C) fp32/fp16/bf16 (may differ from the student's), any strides.
        labels: (B,) int64 or None; selects per-class temperatures and ignored rows.
        teacher_temperature: fp32 (C,) with labels or (B,) without, or None for the scalar.
        student_temperature: likewise.
        teacher_temperature_scalar: the teacher's temperature when its tensor is None.
        student_temperature_scalar: the student's temperature when its tensor is None.
        ignore_index: rows whose label equals it get loss 0 and gradients 0.
        student_grad: whether to compute d row_loss / d student_logits.
        teacher_grad: whether to compute d row_loss / d teacher_logits.

    Returns:
        tuple: row_loss (B,) fp32; grad_student (B, C) in the student's dtype, contiguous (or an
        empty (0,) tensor when not asked for); grad_teacher likewise for the teacher.
    """
    return launch(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                  teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad, teacher_grad)


def launch(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
           teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad, teacher_grad,
           online=None, config=None):
    """``kd_kl_div_forward`` with the kernel choice and its launch configuration open.

    Args:
        student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
        teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad,
        teacher_grad: as for ``kd_kl_div_forward``.
        online: True/False forces the online/tile kernel; None picks by C.
        config: a dict of BLOCK_M, BLOCK_N, num_warps replacing the default configuration.

    Returns:
        tuple: row_loss, grad_student, grad_teacher as for ``kd_kl_div_forward``.
    """
    _check_inputs(student_logits, teacher_logits, labels)
    batch, num_classes = student_logits.shape
    device = student_logits.device
    tau_t = _check_temperature(teacher_temperature, teacher_temperature_scalar, labels, batch, num_classes, device,
                               "teacher_temperature")
    tau_s = _check_temperature(student_temperature, student_temperature_scalar, labels, batch, num_classes, device,
                               "student_temperature")
    if device.type == "cpu":
        # The interpreter has no device asserts: the same checks, eagerly.
        _check_values_eagerly(labels, [("teacher_temperature", tau_t[0]), ("student_temperature", tau_s[0])],
                              ignore_index, num_classes)
    row_loss = torch.empty(batch, dtype=torch.float32, device=device)
    grad_student = torch.empty((batch, num_classes) if student_grad else (0,), dtype=student_logits.dtype,
                               device=device)
    grad_teacher = torch.empty((batch, num_classes) if teacher_grad else (0,), dtype=teacher_logits.dtype,
                               device=device)
    if batch == 0:
        return row_loss, grad_student, grad_teacher
    if online is None:
        online = num_classes > ONLINE_THRESHOLD
    if config is None:
        config = (online_config if online else tile_config)(batch, num_classes)
    if labels is None:
        labels_arg, stride_l = torch.empty(1, dtype=torch.int64, device=device), 0
    else:
        labels_arg, stride_l = labels, labels.stride(0)
    grid = (triton.cdiv(batch, config["BLOCK_M"]),)
    # A gradient not asked for passes its empty (0,) output: nothing is stored through it.
    # Triton launches on the current CUDA device: make it the tensors' one.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _kd_kl_div_kernel[grid](
            student_logits, teacher_logits, labels_arg,
            row_loss if tau_t[0] is None else tau_t[0], row_loss if tau_s[0] is None else tau_s[0],
            row_loss, grad_student, grad_teacher,
            batch, num_classes, *student_logits.stride(), *teacher_logits.stride(), stride_l,
            float(teacher_temperature_scalar), float(student_temperature_scalar), tau_t[1], tau_s[1],
            int(labels is not None), int(ignore_index), int(bool(student_grad)), int(bool(teacher_grad)),
            ONLINE=bool(online), BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
            num_warps=config["num_warps"], debug=True, sanitize_overflow=False,
        )
    return row_loss, grad_student, grad_teacher
