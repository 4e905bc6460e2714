"""Fused temperature-scaled KD loss forward in Triton: the weighted row KL and its gradients.

Per row i: p = softmax(t_i / tau_t), q = softmax(s_i / tau_s), row_loss = w_i KL(p || q) with
0 log 0 = 0, grad_student = w_i (q - p) / tau_s, grad_teacher = w_i p ((log p - log q) - KL) / tau_t.
Temperatures are one scalar, one per class (gathered by the row's label) or one per row. The
row weight w_i = sample_weight_scalar * weight[label_i] * sample_weight[i] (a tensor left None
counts 1) is one fp32 scalar per row, read once by each program that writes the row's outputs
and folded into the per-row factors 1/tau: it adds no work per element. The semantics are fixed
by the shared contract of ``torch.ops.fastabsld.kd_kl_div_forward``. A kept row whose student
or teacher logits are all -inf has no distribution: its loss and gradients are NaN (as the
reference's loss, also at weight 0); a row weight of 0 gives 0 (NaN where the KL is +inf, as
0 * inf); ignored rows give 0 whatever their weight.

Two launch forms, chosen by ``plan`` so that a GPU with ``sms`` multiprocessors gets at least two
programs per SM when one input holds >= 1 MiB, at least one from 256 KiB, and one program per row
(up to ``sms``) below:

* tile (``_kd_tile_kernel``; C <= TILE_MAX_COLUMNS and enough rows): BLOCK_M rows x
  next_pow2(C) columns in registers, ``elements_per_thread`` of each input per thread. s and t
  are read once and each requested gradient written once. Contiguous rows are read VEC
  elements at a time (VEC: the power of two dividing C and the row strides, up to 16 bytes) so
  that consecutive threads read consecutive addresses, padding lives in registers only, and
  in-tile offsets are 32-bit (64-bit only where a tile spans 2^31 elements: WIDE).
* split (larger C, or too few rows to fill the GPU): one persistent kernel (``_kd_split_kernel``)
  after a zeroed int32 workspace (``torch.zeros``: a fill launch, so 2 launches forward). Each row
  is cut into n_chunks chunks of whole BLOCK_N column blocks; a statistics item S reads a
  (row, chunk) and writes its max and sum-exp of both distributions, its cross term
  sum exp(a - m_t) (a - b) (a = t / tau_t, b = s / tau_s) and the largest a where b is -inf; a
  gradient item G re-reads the chunk and writes its gradients from the row's statistics. The
  grid is the programs the SMs hold at once (``split_programs``), each taking items by ticket
  (an atomic counter) in the order S_0 .. S_{L-1}, G_0, S_L, G_1, ... (``split_item``; lag L =
  n_chunks + programs). Each S counts itself in its row's counter; the one that completes the
  row combines the row's partials in chunk order (deterministic: the same bits whatever ran
  where) and marks the row ready; a G waits for its row to be ready, which only items handed
  out before it can hold up: no deadlock under any scheduling, and a program that runs alone
  (the interpreter's) takes every ticket itself. The last program to finish reduces the row
  losses (as ``_kd_reduce_kernel``). Within a chunk the block maxima are one 3-operand
  reduction per step and the sums stay per lane until the chunk's one reduction. The column
  loops of a chunk of several blocks are software-pipelined: cp.async stages (NUM_STAGES)
  where every load is at least 4 bytes wide, else an explicit register prefetch of the next
  block (PREFETCH).

Memory traffic per element (e_s, e_t: bytes of the student's and teacher's dtype):

* tile: reads e_s + e_t, writes e_s and/or e_t (the gradients asked for): the minimum (fp32 with
  the student gradient: 12 B; bf16: 6 B). Ignored rows read nothing.
* split: reads e_s + e_t in the statistics items and again in the gradient items, and writes
  the gradients. ``split_config`` picks the chunk so that what passes through L2 between a
  chunk's read and its re-read ((L + programs) items of reads and gradient writes,
  ``split_working_set``) stays within SPLIT_L2_BUDGET: the re-read then comes from L2 and DRAM
  sees the tile form's bytes (fp32 with the student gradient: 12 B). Without a gradient there is
  no re-read. Per row: labels, temperatures, loss, 6 fp32 partials per chunk and ROW_STATISTICS
  fp32 values for its gradient items (each written once and read from L2 by the row's other
  items), one int32 counter.

Per row, not per element, a weighted call adds 4 B for each weight tensor given (the gathered
class weight, the sample weight): once per row in the tile form, once per (row, chunk) program
of the split form's completing statistics item (its gradient items read the weighted factors it
publishes). A number weight is a kernel argument and moves nothing.

Bad labels and temperatures give their rows NaN. Device asserts on them are compiled in only in
the debug mode (``FASTABSLD_DEVICE_ASSERTS=1``, see ``device_asserts``); they run last in each
kernel, so that nothing is live across the assert's call.

The eager path (``loss``) caches each call's plan by its metadata and, after a kernel's first
launch, launches the compiled kernel through its launcher directly; a finishing kernel
(``_kd_reduce_kernel``, after the tile form; the split kernel reduces itself) reduces the rows
on the device and ``scale_gradient`` (``_kd_scale_kernel``) is the backward, one launch.

Math is fp32 whatever the input dtype; gradients are stored in the dtype of their output buffer
(the logits' dtype for the op; fp32 for fp16 logits on the eager path). The
temperature modes, the labels' and weights' presence, the gradient flags and the sizes are
runtime arguments (uniform branches and per-row scalar work), excluded from Triton's value
specialisation; the compiled variants are the launch form x (student, teacher) dtypes x the constexprs ``plan``
picks x the column strides' and pointers' specialisation (unit stride, 16-divisible,
16-byte-aligned) x 32- or 64-bit integers by value.
"""

import contextlib
import dataclasses
import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel
from triton.knobs import HookChain
from triton.runtime import driver as triton_driver

from .kd_kl_div_checks import check_values

SCALAR, BY_LABEL, BY_ROW = 0, 1, 2
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Multiprocessors the plan fills when the tensors' device does not say (CPU or meta tensors):
# an H100 or H200 SXM.
DEFAULT_SMS = 132
# Logit sizes (bytes of one input, B*C*element size) from which the plan asks for one, then two,
# programs per multiprocessor.
ONE_WAVE_BYTES = 256 * 1024
TWO_WAVE_BYTES = 1024 * 1024
# The widest row the tile kernel holds in registers and the elements of each input a thread
# holds: with 8 each of s and t read as vectors (4 when each element has its own 64-bit address),
# every variant stays at or below 128 registers a thread without spills.
TILE_MAX_COLUMNS = 8192
ELEMENTS_PER_THREAD = 8
SCALAR_ELEMENTS_PER_THREAD = 4
MAX_WARPS = 32
# Rows of a tile at most (the per-row setup is vectorised over them).
TILE_MAX_ROWS = 256
# Split form: columns per loop step, smallest chunk, cp.async stages, partials combined per step,
# warps per program at most.
SPLIT_BLOCK_N = 2048
SPLIT_MIN_CHUNK = 256
SPLIT_STAGES = 3
PARTIAL_BLOCK = 128
SPLIT_MAX_WARPS = 8
# Partials per (row, chunk): max_t, max_s, sum-exp_t, sum-exp_s, cross, largest a where b = -inf.
N_PARTIALS = 6
# Values per row that the gradient items read (contiguous): max_t, max_s, log2 sum-exp2_t, log2 sum-exp2_s
# (base 2, see ``_combine_partials``), KL, the loads' factors log2(e) / tau_t and log2(e) / tau_s, and the
# gradients' w / tau_t and w / tau_s. (The row's kept and bad flags ride on its counter.)
ROW_STATISTICS = 9
# The split kernel's int32 work counters: the ticket, the programs finished, one per row.
WORK_COUNTERS = 2
# Bytes the split form's working set between a chunk's read and its re-read may take in L2 (see
# ``split_config``): a third of an H100's 50 MB and 40% of an A100's 40 MB, so that what other
# streams and the L2's two partitions keep does not evict it.
SPLIT_L2_BUDGET = 16 * 1024 * 1024
# What the split plan assumes of one multiprocessor to size its persistent grid (H100 and A100
# alike): 64K registers, 2048 threads, 32 CTAs, 228 KB of shared memory (1 KB reserved a CTA),
# and at most SPLIT_MAX_REGISTERS registers a thread (the ahead-of-time tests hold every
# variant to it).
SM_REGISTERS = 65536
SM_THREADS = 2048
SM_CTAS = 32
SM_SHARED_BYTES = 228 * 1024
CTA_RESERVED_SHARED_BYTES = 1024
SPLIT_MAX_REGISTERS = 128
# The constants above that the kernels read (a Triton kernel sees a module global only as a
# constexpr), and the base changes of the split form's base-2 statistics.
_N_PARTIALS = tl.constexpr(N_PARTIALS)
_ROW_STATISTICS = tl.constexpr(ROW_STATISTICS)
_WORK_COUNTERS = tl.constexpr(WORK_COUNTERS)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Bytes a vector access covers at most.
MAX_VECTOR_BYTES = 16
INT32_LIMIT = 2**31
# Set to 1 to compile the device asserts in (see ``device_asserts``).
DEVICE_ASSERTS_ENV = "FASTABSLD_DEVICE_ASSERTS"
DEVICE_ASSERTS = os.environ.get(DEVICE_ASSERTS_ENV) == "1"

# Integer arguments that Triton must not specialise on (value 1, divisibility by 16): sizes,
# row strides (their alignment reaches the kernel through VEC instead), modes and flags. The
# column strides stay specialised: a unit stride is what makes a row contiguous.
RUNTIME_INTS = ("B", "C", "stride_sb", "stride_tb", "stride_l", "tau_t_mode", "tau_s_mode", "has_labels",
                "ignore_index", "student_grad", "teacher_grad", "n_chunks", "blocks_per_chunk", "lag",
                "has_weight", "has_sample_weight")


@triton.jit
def _temperature(tau_ptr, tau_scalar, tau_mode, label, row, usable):
    """Each row's temperature: the scalar, tau[label] or tau[row] (by ``tau_mode``)."""
    index = tl.where(tau_mode == 1, label, row.to(tl.int64))
    return tl.load(tau_ptr + index, mask=usable & (tau_mode != 0), other=tau_scalar)


@triton.jit
def _row_setup(labels_ptr, stride_l, tau_t_ptr, tau_s_ptr, tau_t_scalar, tau_s_scalar, tau_t_mode, tau_s_mode,
               has_labels, ignore_index, rows, row_mask, C):
    """Per-row flags and inverse temperatures (``rows``: a vector of row indices, or one index).

    Returns keep (row exists and is not ignored), bad (kept row with a label out of range or a
    temperature that is not positive and finite: its outputs become NaN), 1/tau_t and 1/tau_s
    (1 for rows not kept or bad), the two conditions ``_assert_rows`` checks, and the label and
    usable (kept with a label in range) for ``_row_weight``.
    """
    label = tl.load(labels_ptr + rows.to(tl.int64) * stride_l, mask=row_mask & (has_labels != 0), other=0)
    keep = row_mask & ((has_labels == 0) | (label != ignore_index))
    label_ok = (label >= 0) & (label < C)
    usable = keep & label_ok
    tau_t = _temperature(tau_t_ptr, tau_t_scalar, tau_t_mode, label, rows, usable)
    tau_s = _temperature(tau_s_ptr, tau_s_scalar, tau_s_mode, label, rows, usable)
    tau_ok = (tau_t > 0) & (tau_t < float("inf")) & (tau_s > 0) & (tau_s < float("inf"))
    valid = usable & tau_ok
    inv_t = 1.0 / tl.where(valid, tau_t, 1.0)
    inv_s = 1.0 / tl.where(valid, tau_s, 1.0)
    return keep, keep & ~valid, inv_t, inv_s, label_ok | ~keep, tau_ok | ~usable, label, usable


@triton.jit
def _row_weight(weight_ptr, sample_weight_ptr, weight_scalar, has_weight, has_sample_weight, label, rows, usable,
                row_mask):
    """Each row's weight: weight_scalar * weight[label] (``has_weight``) * sample_weight[row] (``has_sample_weight``).

    ``rows`` is a vector of row indices or one index, ``label`` and ``usable`` as ``_row_setup``
    returns them. Rows not usable read the class weight 1: their outputs are 0 or NaN whatever it is.
    """
    by_class = tl.load(weight_ptr + label, mask=usable & (has_weight != 0), other=1.0)
    by_row = tl.load(sample_weight_ptr + rows.to(tl.int64), mask=row_mask & (has_sample_weight != 0), other=1.0)
    return (weight_scalar * by_class) * by_row


@triton.jit
def _assert_rows(labels_fine, temperatures_fine):
    """With device asserts compiled in, a bad label or temperature fails the launch.

    Called last in each kernel: the assert is a function call, and values live across it would
    be saved to the stack.
    """
    tl.device_assert(labels_fine, "kd_kl_div: a label is outside [0, C) and is not ignore_index")
    tl.device_assert(temperatures_fine, "kd_kl_div: a temperature is not positive and finite")


@triton.jit
def _finish_rows(values, keep, bad):
    """Zero for rows not kept, NaN for bad rows (flags shaped to broadcast against ``values``)."""
    return tl.where(bad, float("nan"), tl.where(keep, values, 0.0))


@triton.jit
def _load_scaled(ptrs, mask, fill, inv_tau):
    """Loads logits as fp32 divided by the row's temperature; ``fill`` where ``mask`` is off."""
    x = tl.load(ptrs, mask=mask)
    return tl.where(mask, x.to(tl.float32) * inv_tau, fill)


@triton.jit
def _store_grads(gs_ptrs, gt_ptrs, mask, log_p, log_q, loss, scale_t, scale_s, keep, bad, student_grad,
                 teacher_grad):
    """Writes (q - p) * scale_s and p * ((log p - log q) - loss) * scale_t, as asked.

    ``loss`` is the row's unweighted KL; the scales are w / tau_s and w / tau_t (w: the row
    weight). The row quantities (loss, scales, keep, bad) are shaped to broadcast against the block.
    """
    p = tl.exp(log_p)
    if student_grad != 0:
        grad = (tl.exp(log_q) - p) * scale_s
        tl.store(gs_ptrs, _finish_rows(grad, keep, bad).to(gs_ptrs.dtype.element_ty), mask=mask)
    if teacher_grad != 0:
        support = p > 0
        diff = tl.where(support, log_p, 0.0) - tl.where(support, log_q, 0.0)
        grad = tl.where(support, p * (diff - loss), 0.0) * scale_t
        tl.store(gt_ptrs, _finish_rows(grad, keep, bad).to(gt_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _aligned(value, VEC: tl.constexpr):
    """``value`` (a multiple of VEC, which the launcher guarantees) in a form Triton knows divides by VEC."""
    return (value // VEC) * VEC


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _kd_tile_kernel(s_ptr, t_ptr, labels_ptr, tau_t_ptr, tau_s_ptr, weight_ptr, sample_weight_ptr, loss_ptr, gs_ptr,
                    gt_ptr, B, C, stride_sb, stride_sc, stride_tb, stride_tc, stride_l,
                    tau_t_scalar, tau_s_scalar, tau_t_mode, tau_s_mode, has_labels, ignore_index,
                    weight_scalar, has_weight, has_sample_weight, student_grad, teacher_grad,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr, WIDE: tl.constexpr):
    """Rows [pid * BLOCK_M, +BLOCK_M) as one (BLOCK_M, BLOCK_N >= C) tile."""
    C = _aligned(C, VEC)
    stride_sb = _aligned(stride_sb, VEC)
    stride_tb = _aligned(stride_tb, VEC)
    row0 = tl.program_id(0) * BLOCK_M
    local = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    if WIDE:
        local = local.to(tl.int64)
        cols = cols.to(tl.int64)
    rows = row0 + local
    row_mask = rows < B
    keep, bad, inv_t, inv_s, labels_fine, temperatures_fine, label, usable = _row_setup(
        labels_ptr, stride_l, tau_t_ptr, tau_s_ptr, tau_t_scalar, tau_s_scalar, tau_t_mode, tau_s_mode, has_labels,
        ignore_index, rows, row_mask, C)
    weight = _row_weight(weight_ptr, sample_weight_ptr, weight_scalar, has_weight, has_sample_weight, label, rows,
                         usable, row_mask)
    # The tile's first row in 64-bit once; offsets inside the tile in 32 bits unless WIDE.
    base = row0.to(tl.int64)
    # Padding columns of kept rows read -inf (probability 0); skipped rows read 0 (finite).
    fill = tl.where(keep, float("-inf"), 0.0)[:, None]
    mask = keep[:, None] & (cols < C)[None, :]
    a = _load_scaled(t_ptr + base * stride_tb + (local[:, None] * stride_tb + cols[None, :] * stride_tc), mask, fill,
                     inv_t[:, None])
    b = _load_scaled(s_ptr + base * stride_sb + (local[:, None] * stride_sb + cols[None, :] * stride_sc), mask, fill,
                     inv_s[:, None])
    max_t = tl.max(a, 1)
    max_s = tl.max(b, 1)
    # A kept row with all -inf logits has no distribution: NaN, as the reference.
    bad = bad | (keep & ((max_t == float("-inf")) | (max_s == float("-inf"))))
    a = a - max_t[:, None]
    b = b - max_s[:, None]
    log_p = a - tl.log(tl.sum(tl.exp(a), 1))[:, None]
    log_q = b - tl.log(tl.sum(tl.exp(b), 1))[:, None]
    p = tl.exp(log_p)
    support = p > 0
    loss = tl.sum(p * (tl.where(support, log_p, 0.0) - tl.where(support, log_q, 0.0)), 1)
    tl.store(loss_ptr + rows, _finish_rows(weight * loss, keep, bad), mask=row_mask)
    out = base * C + (local[:, None] * C + cols[None, :])
    # The row weight folds into the gradients' per-row factors: no work per element.
    _store_grads(gs_ptr + out, gt_ptr + out, row_mask[:, None] & (cols < C)[None, :], log_p, log_q, loss[:, None],
                 (weight * inv_t)[:, None], (weight * inv_s)[:, None], keep[:, None], bad[:, None], student_grad,
                 teacher_grad)
    _assert_rows(labels_fine, temperatures_fine)


@triton.jit
def _split_item(ticket, n_stats, lag):
    """The work item of a ticket of the split kernel: (statistics item?, item index); see ``split_item``."""
    after = ticket - lag
    paired = n_stats - lag
    interleaved = (after >= 0) & (after < 2 * paired)
    odd = (after % 2) == 1
    is_stats = (after < 0) | (interleaved & odd)
    item = tl.where(after < 0, ticket, tl.where(interleaved, tl.where(odd, lag + after // 2, after // 2), after - paired))
    return is_stats, item


@triton.jit
def _block_pointers(s_row, t_row, stride_sc, stride_tc, first_block, k, cols, C, keep, BLOCK_N: tl.constexpr):
    """Pointers to block k of the chunk in both inputs and its mask."""
    col = (first_block + k) * BLOCK_N + cols
    mask = keep & (col < C)
    return s_row + col * stride_sc, t_row + col * stride_tc, mask, col


@triton.jit
def _max3(a0, b0, c0, a1, b1, c1):
    return tl.maximum(a0, a1), tl.maximum(b0, b1), tl.maximum(c0, c1)


@triton.jit
def _sum3(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def _block_statistics(state, a, b):
    """Merges a block of a = log2(e) t / tau_t and b = log2(e) s / tau_s into the running chunk statistics.

    The block's maxima (and the largest a where b is -inf) are one 3-operand reduction; the
    sums stay per lane, rescaled when a maximum grows, and are reduced once per chunk
    (``_chunk_partials``). In base 2, exp(t / tau_t - m) is exp2(a - m'): one ex2 instruction
    (flushing results under 2^-126 to 0, which these sums cannot tell from rounding).
    """
    m_t, m_s, a_at_student_inf, z_t, z_s, cross = state
    finite_b = b > float("-inf")
    block_t, block_s, block_inf = tl.reduce((a, b, tl.where(finite_b, float("-inf"), a)), 0, _max3)
    m_t_new = tl.maximum(m_t, block_t)
    m_s_new = tl.maximum(m_s, block_s)
    # a max that is still -inf shifts by 0 instead (avoids -inf - -inf)
    m_t_safe = tl.where(m_t_new == float("-inf"), 0.0, m_t_new)
    m_s_safe = tl.where(m_s_new == float("-inf"), 0.0, m_s_new)
    alpha_t = tl.exp2(m_t - m_t_safe)
    e_t = tl.exp2(a - m_t_safe)
    in_support = e_t > 0
    a_in = tl.where(in_support, a, 0.0)
    b_in = tl.where(in_support & finite_b, b, a_in)
    z_t = z_t * alpha_t + e_t
    z_s = z_s * tl.exp2(m_s - m_s_safe) + tl.exp2(b - m_s_safe)
    cross = cross * alpha_t + e_t * (a_in - b_in)
    return m_t_new, m_s_new, tl.maximum(a_at_student_inf, block_inf), z_t, z_s, cross


@triton.jit
def _chunk_partials(state):
    """The chunk's 6 partials: its maxima and the lanes' sums reduced (one 3-operand reduction)."""
    m_t, m_s, a_at_student_inf, z_t, z_s, cross = state
    z_t, z_s, cross = tl.reduce((z_t, z_s, cross), 0, _sum3)
    return m_t, m_s, z_t, z_s, cross, a_at_student_inf


@triton.jit
def _split_statistics(s_row, t_row, stride_sc, stride_tc, first_block, n_blocks, cols, C, keep, inv_t, inv_s,
                      BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr, PREFETCH: tl.constexpr):
    """A statistics item: its chunk's max and sum-exp of both distributions, its cross term
    sum exp2(a - m_t) (a - b) and the largest a where b is -inf (6 scalars, in base 2: ``inv_t``
    and ``inv_s`` are log2(e) / tau)."""
    fill = tl.where(keep, float("-inf"), 0.0)
    neg_inf = tl.full([], float("-inf"), tl.float32)
    zero = tl.zeros([BLOCK_N], tl.float32)
    state = (neg_inf, neg_inf, neg_inf, zero, zero, zero)
    if PREFETCH:
        # Loads narrower than 4 bytes cannot be cp.async-staged: block k + 1 is loaded before block k is used.
        s_ptrs, t_ptrs, mask, _ = _block_pointers(s_row, t_row, stride_sc, stride_tc, first_block, 0, cols, C, keep,
                                                  BLOCK_N)
        a_next = _load_scaled(t_ptrs, mask, fill, inv_t)
        b_next = _load_scaled(s_ptrs, mask, fill, inv_s)
        for k in range(0, n_blocks):
            a = a_next
            b = b_next
            s_ptrs, t_ptrs, mask, _ = _block_pointers(s_row, t_row, stride_sc, stride_tc, first_block, k + 1, cols, C,
                                                      keep & (k + 1 < n_blocks), BLOCK_N)
            a_next = _load_scaled(t_ptrs, mask, fill, inv_t)
            b_next = _load_scaled(s_ptrs, mask, fill, inv_s)
            state = _block_statistics(state, a, b)
    else:
        for k in tl.range(0, n_blocks, num_stages=NUM_STAGES):
            s_ptrs, t_ptrs, mask, _ = _block_pointers(s_row, t_row, stride_sc, stride_tc, first_block, k, cols, C, keep,
                                                      BLOCK_N)
            state = _block_statistics(state, _load_scaled(t_ptrs, mask, fill, inv_t),
                                     _load_scaled(s_ptrs, mask, fill, inv_s))
    return _chunk_partials(state)


@triton.jit
def _combine_partials(part_ptr, B, row, n_chunks, PART_BLOCK: tl.constexpr):
    """A row's statistics from its chunks' partials, merged in chunk order (the same bits in every run).

    Returns max_t, max_s, log2 sum-exp2_t, log2 sum-exp2_s (each relative to its max; all in base
    2, as the partials) and the row KL in nats (+inf where the student is -inf under teacher mass,
    decided with a natural exp that keeps probabilities under 2^-126; NaN when either row is all
    -inf). The partials were written by other programs: read from L2 (``.cg``), never from a
    stale L1 line.
    """
    plane = B.to(tl.int64) * n_chunks
    base = part_ptr + row.to(tl.int64) * n_chunks
    neg_inf = tl.full([], float("-inf"), tl.float32)
    zero = tl.zeros([], tl.float32)
    m_t, m_s, z_t, z_s, cross, a_inf = neg_inf, neg_inf, zero, zero, zero, neg_inf
    for start in range(0, n_chunks, PART_BLOCK):
        index = start + tl.arange(0, PART_BLOCK)
        mask = index < n_chunks
        c_m_t = tl.load(base + index, mask=mask, other=float("-inf"), cache_modifier=".cg")
        c_m_s = tl.load(base + plane + index, mask=mask, other=float("-inf"), cache_modifier=".cg")
        c_z_t = tl.load(base + 2 * plane + index, mask=mask, other=0.0, cache_modifier=".cg")
        c_z_s = tl.load(base + 3 * plane + index, mask=mask, other=0.0, cache_modifier=".cg")
        c_cross = tl.load(base + 4 * plane + index, mask=mask, other=0.0, cache_modifier=".cg")
        c_a_inf = tl.load(base + 5 * plane + index, mask=mask, other=float("-inf"), cache_modifier=".cg")
        m_t_new = tl.maximum(m_t, tl.max(c_m_t, 0))
        m_s_new = tl.maximum(m_s, tl.max(c_m_s, 0))
        m_t_safe = tl.where(m_t_new == float("-inf"), 0.0, m_t_new)
        m_s_safe = tl.where(m_s_new == float("-inf"), 0.0, m_s_new)
        scale_t = tl.exp2(c_m_t - m_t_safe)
        alpha_t = tl.exp2(m_t - m_t_safe)
        z_t = z_t * alpha_t + tl.sum(c_z_t * scale_t, 0)
        cross = cross * alpha_t + tl.sum(c_cross * scale_t, 0)
        z_s = z_s * tl.exp2(m_s - m_s_safe) + tl.sum(c_z_s * tl.exp2(c_m_s - m_s_safe), 0)
        a_inf = tl.maximum(a_inf, tl.max(c_a_inf, 0))
        m_t = m_t_new
        m_s = m_s_new
    log_z_t = tl.log2(z_t)
    log_z_s = tl.log2(z_s)
    loss = (cross / z_t - (m_t - m_s) - (log_z_t - log_z_s)) * _LN2
    loss = tl.where(tl.exp(((a_inf - m_t) - log_z_t) * _LN2) > 0, float("inf"), loss)
    loss = tl.where((m_t == float("-inf")) | (m_s == float("-inf")), float("nan"), loss)
    return m_t, m_s, log_z_t, log_z_s, loss


@triton.jit
def _split_gradients(s_row, t_row, gs_row, gt_row, stride_sc, stride_tc, first_block, n_blocks, cols, C, keep, bad,
                     inv_t, inv_s, scale_t, scale_s, m_t, m_s, log_z_t, log_z_s, loss, STUDENT_GRAD: tl.constexpr,
                     TEACHER_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
                     PREFETCH: tl.constexpr):
    """A gradient item: re-reads its chunk and writes the gradients from the row's statistics (base 2,
    as ``_combine_partials`` returns them; ``inv_t``, ``inv_s``: log2(e) / tau; scales: w / tau)."""
    fill = tl.where(keep, float("-inf"), 0.0)
    if PREFETCH:
        s_ptrs, t_ptrs, mask, col = _block_pointers(s_row, t_row, stride_sc, stride_tc, first_block, 0, cols, C, keep,
                                                    BLOCK_N)
        a_next = tl.load(t_ptrs, mask=mask)
        b_next = tl.load(s_ptrs, mask=mask)
        for k in range(0, n_blocks):
            a = tl.where(mask, a_next.to(tl.float32) * inv_t, fill)
            b = tl.where(mask, b_next.to(tl.float32) * inv_s, fill)
            here = col
            s_ptrs, t_ptrs, mask, col = _block_pointers(s_row, t_row, stride_sc, stride_tc, first_block, k + 1, cols,
                                                        C, keep & (k + 1 < n_blocks), BLOCK_N)
            a_next = tl.load(t_ptrs, mask=mask)
            b_next = tl.load(s_ptrs, mask=mask)
            _store_split_grads(gs_row + here, gt_row + here, here < C, (a - m_t) - log_z_t, (b - m_s) - log_z_s,
                               loss, scale_t, scale_s, keep, bad, STUDENT_GRAD, TEACHER_GRAD)
    else:
        for k in tl.range(0, n_blocks, num_stages=NUM_STAGES):
            s_ptrs, t_ptrs, mask, col = _block_pointers(s_row, t_row, stride_sc, stride_tc, first_block, k, cols, C,
                                                        keep, BLOCK_N)
            a = _load_scaled(t_ptrs, mask, fill, inv_t)
            b = _load_scaled(s_ptrs, mask, fill, inv_s)
            _store_split_grads(gs_row + col, gt_row + col, col < C, (a - m_t) - log_z_t, (b - m_s) - log_z_s, loss,
                               scale_t, scale_s, keep, bad, STUDENT_GRAD, TEACHER_GRAD)


@triton.jit
def _store_split_grads(gs_ptrs, gt_ptrs, mask, log2_p, log2_q, loss, scale_t, scale_s, keep, bad,
                       STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """``_store_grads`` from base-2 log-probabilities: the student's gradient (q - p) * scale_s with
    ex2 (probabilities under 2^-126 count 0, as rounding); the teacher's from natural exp, so that
    its support (p > 0) is the tile form's."""
    if STUDENT_GRAD:
        grad = (tl.exp2(log2_q) - tl.exp2(log2_p)) * scale_s
        tl.store(gs_ptrs, _finish_rows(grad, keep, bad).to(gs_ptrs.dtype.element_ty), mask=mask)
    if TEACHER_GRAD:
        _store_grads(gs_ptrs, gt_ptrs, mask, log2_p * _LN2, log2_q * _LN2, loss, scale_t, scale_s, keep, bad, 0, 1)


@triton.jit
def _store_row_statistics(row_stats, m_t, m_s, log_z_t, log_z_s, loss, load_t, load_s, scale_t, scale_s):
    """Publishes what a row's gradient items need (ROW_STATISTICS values, in this order): the
    row's statistics (base 2), its KL, the loads' factors log2(e) / tau and the gradients' w / tau."""
    tl.store(row_stats, m_t)
    tl.store(row_stats + 1, m_s)
    tl.store(row_stats + 2, log_z_t)
    tl.store(row_stats + 3, log_z_s)
    tl.store(row_stats + 4, loss)
    tl.store(row_stats + 5, load_t)
    tl.store(row_stats + 6, load_s)
    tl.store(row_stats + 7, scale_t)
    tl.store(row_stats + 8, scale_s)


@triton.jit
def _load_row_statistics(row_stats):
    """The values ``_store_row_statistics`` published, in its order, read from L2 (``.cg``): another
    program wrote them, and a stale L1 line must not answer."""
    return (tl.load(row_stats, cache_modifier=".cg"), tl.load(row_stats + 1, cache_modifier=".cg"),
            tl.load(row_stats + 2, cache_modifier=".cg"), tl.load(row_stats + 3, cache_modifier=".cg"),
            tl.load(row_stats + 4, cache_modifier=".cg"), tl.load(row_stats + 5, cache_modifier=".cg"),
            tl.load(row_stats + 6, cache_modifier=".cg"), tl.load(row_stats + 7, cache_modifier=".cg"),
            tl.load(row_stats + 8, cache_modifier=".cg"))


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _kd_split_kernel(s_ptr, t_ptr, labels_ptr, tau_t_ptr, tau_s_ptr, weight_ptr, sample_weight_ptr, part_ptr, work_ptr,
                     loss_ptr, gs_ptr, gt_ptr, out_ptr, B, C, stride_sb, stride_sc, stride_tb, stride_tc,
                     stride_l, n_chunks, blocks_per_chunk, lag, tau_t_scalar, tau_s_scalar, tau_t_mode, tau_s_mode,
                     has_labels, ignore_index, weight_scalar, has_weight, has_sample_weight, per_row,
                     BLOCK_N: tl.constexpr, VEC: tl.constexpr, WIDE: tl.constexpr, NUM_STAGES: tl.constexpr,
                     PREFETCH: tl.constexpr, PART_BLOCK: tl.constexpr, REDUCE: tl.constexpr, MEAN: tl.constexpr,
                     REDUCE_BLOCK: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """The split form, persistent: each program takes work items by ticket until none is left.

    Items (see ``split_item``): a statistics item writes its (row, chunk)'s 6 partials to
    part[k, row * n_chunks + chunk] and counts itself in the row's counter (work[2 + row]); the
    program that completes the count combines the row's partials in chunk order, writes the row
    loss and what the row's gradient items need (part[N_PARTIALS * B * n_chunks + row * ROW_STATISTICS + k])
    and counts once more, by 1 + kept + 2 * bad: the row is ready, and its gradient items read its
    flags from the count. A gradient item waits for its row to be ready, re-reads its
    chunk (read by the statistics pass at most about lag + programs items earlier: from L2 when
    ``split_config`` sized the plan for it) and writes the gradients. With REDUCE, the last
    program to finish (work[1] counts them) reduces the row losses as ``_kd_reduce_kernel`` does.
    Without a gradient asked for (STUDENT_GRAD, TEACHER_GRAD) there are no gradient items.
    ``work`` must be zeros at launch.

    Ordering: what a program publishes (partials, row statistics, row losses) is stored, then a
    CTA barrier, then the count (release; the statistics count is acquire-release so that the
    completing program sees every chunk's partials). Readers count or poll with acquire and read
    the published values from L2 (``.cg``).
    """
    C = _aligned(C, VEC)
    stride_sb = _aligned(stride_sb, VEC)
    stride_tb = _aligned(stride_tb, VEC)
    cols = tl.arange(0, BLOCK_N)
    if WIDE:
        cols = cols.to(tl.int64)
    n_stats = B * n_chunks
    total = n_stats
    if STUDENT_GRAD or TEACHER_GRAD:
        total = 2 * n_stats
    column_blocks = tl.cdiv(C, BLOCK_N)
    row_stats_ptr = part_ptr + _N_PARTIALS * (B.to(tl.int64) * n_chunks)  # after the partials' planes
    labels_ok = tl.full([], 1, tl.int32)
    temperatures_ok = tl.full([], 1, tl.int32)
    ticket = tl.atomic_add(work_ptr, 1, sem="relaxed")
    while ticket < total:
        is_stats, item = _split_item(ticket, n_stats, lag)
        row = item // n_chunks
        chunk = item - row * n_chunks
        first_block = chunk * blocks_per_chunk
        n_blocks = tl.minimum(blocks_per_chunk, column_blocks - first_block)
        s_row = s_ptr + row.to(tl.int64) * stride_sb
        t_row = t_ptr + row.to(tl.int64) * stride_tb
        counter = work_ptr + _WORK_COUNTERS + row
        row_stats = row_stats_ptr + row.to(tl.int64) * _ROW_STATISTICS  # contiguous per row
        if is_stats:
            keep, bad, inv_t, inv_s, labels_fine, temperatures_fine, label, usable = _row_setup(
                labels_ptr, stride_l, tau_t_ptr, tau_s_ptr, tau_t_scalar, tau_s_scalar, tau_t_mode, tau_s_mode,
                has_labels, ignore_index, row, row < B, C)
            labels_ok = labels_ok & labels_fine.to(tl.int32)
            temperatures_ok = temperatures_ok & temperatures_fine.to(tl.int32)
            # the statistics in base 2: exp2 is one instruction, exp three more
            m_t, m_s, z_t, z_s, cross, a_inf = _split_statistics(
                s_row, t_row, stride_sc, stride_tc, first_block, n_blocks, cols, C, keep, inv_t * _LOG2E,
                inv_s * _LOG2E, BLOCK_N, NUM_STAGES, PREFETCH)
            plane = B.to(tl.int64) * n_chunks
            out = part_ptr + (row.to(tl.int64) * n_chunks + chunk)
            tl.store(out, m_t)
            tl.store(out + plane, m_s)
            tl.store(out + 2 * plane, z_t)
            tl.store(out + 3 * plane, z_s)
            tl.store(out + 4 * plane, cross)
            tl.store(out + 5 * plane, a_inf)
            # every thread's stores before the count that publishes them
            tl.debug_barrier()
            arrived = tl.atomic_add(counter, 1, sem="acq_rel")
            if arrived == n_chunks - 1:
                r_m_t, r_m_s, log_z_t, log_z_s, loss = _combine_partials(part_ptr, B, row, n_chunks, PART_BLOCK)
                weight = _row_weight(weight_ptr, sample_weight_ptr, weight_scalar, has_weight, has_sample_weight,
                                     label, row, usable, row < B)
                bad = bad | (keep & (loss != loss))
                tl.store(loss_ptr + row, _finish_rows(weight * loss, keep, bad))
                # so that the row's gradient items read no label, temperature or weight; its flags ride on its count
                _store_row_statistics(row_stats, r_m_t, r_m_s, log_z_t, log_z_s, loss, inv_t * _LOG2E, inv_s * _LOG2E,
                                      weight * inv_t, weight * inv_s)
                tl.debug_barrier()
                # ready: the count passes n_chunks, by 1 + kept + 2 * bad (a bad row is a kept one)
                tl.atomic_add(counter, 1 + keep.to(tl.int32) + 2 * bad.to(tl.int32), sem="release")
        else:
            ready = tl.atomic_add(counter, 0, sem="acquire")
            while ready <= n_chunks:
                ready = tl.atomic_add(counter, 0, sem="acquire")
            flags = ready - n_chunks - 1
            g_m_t, g_m_s, g_log_z_t, g_log_z_s, g_loss, load_t, load_s, scale_t, scale_s = _load_row_statistics(row_stats)
            _split_gradients(s_row, t_row, gs_ptr + row.to(tl.int64) * C, gt_ptr + row.to(tl.int64) * C, stride_sc,
                             stride_tc, first_block, n_blocks, cols, C, (flags & 1) != 0, (flags & 2) != 0, load_t,
                             load_s, scale_t, scale_s, g_m_t, g_m_s, g_log_z_t, g_log_z_s, g_loss, STUDENT_GRAD,
                             TEACHER_GRAD, BLOCK_N, NUM_STAGES, PREFETCH)
        ticket = tl.atomic_add(work_ptr, 1, sem="relaxed")
    if REDUCE:
        # every row this program finished is written before it counts itself out
        tl.debug_barrier()
        finished = tl.atomic_add(work_ptr + 1, 1, sem="acq_rel")
        if finished == tl.num_programs(0) - 1:
            _reduce_rows(loss_ptr, labels_ptr, out_ptr, B, stride_l, has_labels, ignore_index, per_row, MEAN,
                         REDUCE_BLOCK)
    _assert_rows(labels_ok != 0, temperatures_ok != 0)


@triton.jit
def _reduce_rows(loss_ptr, labels_ptr, out_ptr, B, stride_l, has_labels, ignore_index, per_row,
                 MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """The reduced loss from the row losses, in a fixed order (the same bits every run).

    Writes out = sum of the rows (MEAN: divided by kept rows * ``per_row``) and, at loss[B] (the
    row buffer holds B + 1 values), the factor the backward multiplies the stored gradients by:
    1, or 1 / (kept rows * per_row). No rows kept counts as one (a loss of 0 and zero gradients,
    not 0 / 0). The row losses are read from L2 (``.cg``): other programs of the same launch may
    have written them.
    """
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], tl.float32)
    kept = tl.zeros([BLOCK], tl.int32)
    for start in range(0, B, BLOCK):
        rows = start + offsets
        mask = rows < B
        total += tl.load(loss_ptr + rows, mask=mask, other=0.0, cache_modifier=".cg")
        if MEAN:
            label = tl.load(labels_ptr + rows.to(tl.int64) * stride_l, mask=mask & (has_labels != 0), other=0)
            kept += (mask & ((has_labels == 0) | (label != ignore_index))).to(tl.int32)
    total_sum = tl.sum(total, 0)
    if MEAN:
        # At least one row counts: with none kept the sum (0) stays 0 and the gradients zero (as on every backend).
        denominator = tl.maximum(tl.sum(kept, 0), 1).to(tl.float32) * per_row
        tl.store(out_ptr, total_sum / denominator)
        tl.store(loss_ptr + B, 1.0 / denominator)
    else:
        tl.store(out_ptr, total_sum)
        tl.store(loss_ptr + B, 1.0)


@triton.jit(do_not_specialize=("B", "stride_l", "has_labels", "ignore_index"))
def _kd_reduce_kernel(loss_ptr, labels_ptr, out_ptr, B, stride_l, has_labels, ignore_index, per_row,
                      MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """The reduced loss from the row losses, in one program (``_reduce_rows``)."""
    _reduce_rows(loss_ptr, labels_ptr, out_ptr, B, stride_l, has_labels, ignore_index, per_row, MEAN, BLOCK)


@triton.jit(do_not_specialize=("n", "C", "stride_g", "scale_index"))
def _kd_scale_kernel(grad_ptr, out_ptr, grad_output_ptr, scale_ptr, n, C, stride_g, scale_index,
                     PER_ROW: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """out = stored gradient * grad_output (per row, or the reduced loss's times scale[scale_index]),
    in fp32, stored in out's dtype: the backward of the loss, one read and one write per element."""
    start = tl.program_id(0)
    if WIDE:
        start = start.to(tl.int64)
    offsets = start * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if PER_ROW:
        factor = tl.load(grad_output_ptr + (offsets // C) * stride_g, mask=mask, other=0.0).to(tl.float32)
    else:
        factor = tl.load(grad_output_ptr).to(tl.float32) * tl.load(scale_ptr + scale_index)
    tl.store(out_ptr + offsets, (grad * factor).to(out_ptr.dtype.element_ty), mask=mask)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch of a plan: ``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)``."""

    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int = 1
    debug: bool = False
    maxnreg: int = None

    def options(self):
        """The compile options the launch passes (device asserts compiled in when ``debug``; a
        register limit when ``maxnreg``)."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages, "debug": self.debug,
                   "sanitize_overflow": False}
        if self.maxnreg is not None:
            options["maxnreg"] = self.maxnreg
        return options

    def run(self):
        """Launches the kernel."""
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options())


def vector_width(num_classes, batch, tensors):
    """Elements a thread reads at a time along a row: the largest power of two dividing C and
    every row stride (rows beyond the first only), at most MAX_VECTOR_BYTES of the widest dtype;
    1 unless every column stride is 1.

    Args:
        num_classes: C.
        batch: B.
        tensors: the (B, C) logits.

    Returns:
        int: VEC.
    """
    if num_classes == 1 or any(t.stride(1) != 1 for t in tensors):
        return 1
    common = num_classes
    for t in tensors:
        if batch > 1:
            common = math.gcd(common, t.stride(0))
    vec = common & -common
    return max(1, min(vec, MAX_VECTOR_BYTES // max(t.element_size() for t in tensors)))


def _next_power_of_2(n):
    """The smallest power of two >= n (n >= 1), in plain integer arithmetic."""
    return 1 << (n - 1).bit_length()


def programs_wanted(nbytes, sms=DEFAULT_SMS):
    """Programs a launch should have: 2 per multiprocessor from TWO_WAVE_BYTES of logits, else one
    (the tile plan gives fewer when there are fewer rows and the logits are small).

    Args:
        nbytes: bytes of the larger input (B*C*element size).
        sms: multiprocessors of the GPU.

    Returns:
        int: the target number of programs.
    """
    return 2 * sms if nbytes >= TWO_WAVE_BYTES else sms


def elements_per_thread(vec):
    """Elements of each input a thread holds: fewer when every element needs its own address.

    Args:
        vec: the vector width (``vector_width``).

    Returns:
        int: ELEMENTS_PER_THREAD, or SCALAR_ELEMENTS_PER_THREAD for vec == 1.
    """
    return ELEMENTS_PER_THREAD if vec > 1 else SCALAR_ELEMENTS_PER_THREAD


def tile_config(batch, num_classes, sms=DEFAULT_SMS, nbytes=None, vec=2):
    """Launch configuration of the tile kernel: the most rows a program (at most TILE_MAX_ROWS,
    and a tile of at most ELEMENTS_PER_THREAD * 32 * MAX_WARPS elements) that still leaves
    ``programs_wanted`` programs, at least one row; ``elements_per_thread`` a thread.

    Args:
        batch: B.
        num_classes: C (at most TILE_MAX_COLUMNS).
        sms: multiprocessors of the GPU.
        nbytes: bytes of the larger input (default: fp32 logits).
        vec: the rows' vector width.

    Returns:
        dict: BLOCK_M, BLOCK_N, num_warps.
    """
    nbytes = batch * num_classes * 4 if nbytes is None else nbytes
    want = programs_wanted(nbytes, sms)
    block_n = _next_power_of_2(num_classes)
    max_elements = ELEMENTS_PER_THREAD * 32 * MAX_WARPS
    block_m = 1
    while (2 * block_m <= TILE_MAX_ROWS and 2 * block_m * block_n <= max_elements
           and -(-batch // (2 * block_m)) >= want):
        block_m *= 2
    num_warps = min(MAX_WARPS, max(1, block_m * block_n // (32 * elements_per_thread(vec))))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps}


def split_config(batch, num_classes, sms=DEFAULT_SMS, nbytes=None, vec=2, column_bytes=12,
                 l2_budget=SPLIT_L2_BUDGET, input_bytes=8):
    """Launch configuration of the split kernel: the largest power-of-two chunk (at least
    SPLIT_MIN_CHUNK columns) that gives ``programs_wanted`` (row, chunk) items and keeps the
    working set between a chunk's read and its re-read (``split_working_set``) within
    ``l2_budget``; one chunk per row when the rows alone allow it. ``elements_per_thread`` a
    thread, at most SPLIT_MAX_WARPS warps; the persistent grid of ``split_programs`` (no more
    than the items) and the lag n_chunks + programs (see ``split_item``).

    Args:
        batch: B.
        num_classes: C.
        sms: multiprocessors of the GPU.
        nbytes: bytes of the larger input (default: fp32 logits).
        vec: the rows' vector width.
        column_bytes: bytes a chunk's column moves while it must stay in L2: both inputs read
            and the stored gradients written (fp32, student gradient: 12); 0 without gradients
            (nothing is re-read).
        l2_budget: bytes of L2 the working set may take.
        input_bytes: e_s + e_t (sizes the cp.async buffers).

    Returns:
        dict: BLOCK_N (columns per loop step), CHUNK (columns per item, a multiple of
        BLOCK_N), num_warps, num_stages, PROGRAMS (the grid), LAG.
    """
    nbytes = batch * num_classes * 4 if nbytes is None else nbytes
    want = programs_wanted(nbytes, sms)
    per_thread = elements_per_thread(vec)
    chunk = _next_power_of_2(num_classes)
    while True:
        block_n = min(SPLIT_BLOCK_N, chunk, 32 * SPLIT_MAX_WARPS * per_thread)
        num_warps = max(1, block_n // (32 * per_thread))
        stages = SPLIT_STAGES if chunk > block_n else 1
        n_chunks = -(-num_classes // chunk)
        items = batch * n_chunks
        programs = min(split_programs(num_warps, split_shared_bytes(block_n, stages, input_bytes), sms), items)
        lag = split_lag(n_chunks, programs, items, column_bytes > 0)
        fits = split_working_set(lag, programs, chunk, column_bytes) <= l2_budget
        if chunk <= SPLIT_MIN_CHUNK or (items >= want and fits):
            return {"BLOCK_N": block_n, "CHUNK": chunk, "num_warps": num_warps, "num_stages": stages,
                    "PROGRAMS": programs, "LAG": lag}
        chunk //= 2


def split_shared_bytes(block_n, num_stages, input_bytes):
    """Shared memory a split program may take: the cp.async buffers of both inputs (num_stages - 1
    blocks in each of its two column loops) and 4 KiB for its reductions and its atomics' results.

    Args:
        block_n: BLOCK_N.
        num_stages: cp.async stages (1: none).
        input_bytes: e_s + e_t.

    Returns:
        int: bytes per CTA.
    """
    return 2 * (num_stages - 1) * block_n * input_bytes + 4096


def split_programs(num_warps, shared_bytes, sms=DEFAULT_SMS):
    """The split kernel's persistent grid: as many programs as the SMs hold at once.

    Per SM the CTAs that fit by registers (at most SPLIT_MAX_REGISTERS a thread), threads, the CTA
    limit and shared memory (SM_* constants). More programs would only queue; fewer leave an SM
    idle. The kernel is correct with any grid (see ``split_item``).

    Args:
        num_warps: warps per program.
        shared_bytes: shared memory per program (``split_shared_bytes``).
        sms: multiprocessors of the GPU.

    Returns:
        int: programs.
    """
    per_sm = min(SM_REGISTERS // (SPLIT_MAX_REGISTERS * 32 * num_warps), SM_THREADS // (32 * num_warps), SM_CTAS,
                 SM_SHARED_BYTES // (shared_bytes + CTA_RESERVED_SHARED_BYTES))
    return sms * max(1, per_sm)


def split_lag(n_chunks, programs, items, gradients, lag=None):
    """The tickets by which the gradient items trail the statistics items (see ``split_item``).

    The default n_chunks + programs puts a gradient item at least ``programs`` tickets after the
    last statistics item of its row: those items were handed out earlier than any of the
    ``programs`` items in flight with it, so it rarely waits. (A lag of max(n_chunks, programs)
    would put the gradient item of a row right after the row's last statistics item when
    n_chunks >= programs, and it would wait for that item.)

    Args:
        n_chunks: chunks per row.
        programs: programs of the grid.
        items: statistics items (B * n_chunks).
        gradients: whether gradient items exist (without them the lag is every item).
        lag: a lag to use instead of the default (tests), at least n_chunks.

    Returns:
        int: the lag, at most ``items``.
    """
    if not gradients:
        return items
    if lag is None:
        lag = n_chunks + programs
    if lag < n_chunks:
        raise ValueError(f"the split form's lag must be at least the chunks per row ({n_chunks}), got {lag}: "
                         "a gradient item would wait for a statistics item handed out after it")
    return min(lag, items)


def split_working_set(lag, programs, chunk, column_bytes):
    """Bytes that pass through L2 between a chunk's read by its statistics item and its re-read.

    The tickets of a chunk's statistics and gradient items lie 2 * lag - 1 apart; between the two
    run at most ``lag`` other statistics items (reading their chunks) and ``lag`` gradient items
    (writing their gradients), and up to ``programs`` items handed out before the read may still
    be in flight. The bound assumes no program falls more than ``programs`` tickets behind the
    others (every item is about the same work).

    Args:
        lag: the lag.
        programs: programs of the grid.
        chunk: columns per item.
        column_bytes: bytes per column read and written (see ``split_config``).

    Returns:
        int: bytes.
    """
    return (lag + programs) * chunk * column_bytes


def split_item(ticket, n_stats, lag):
    """The work item the split kernel's ticket ``ticket`` stands for (``_split_item`` on the device).

    Statistics items S_i (i = row * n_chunks + chunk) and gradient items G_j are handed out as
    S_0 .. S_{lag-1}, G_0, S_lag, G_1, S_{lag+1}, ..., then the remaining G: 2 * n_stats tickets
    (n_stats without gradients, where lag = n_stats). With lag >= n_chunks every G_j comes after
    every statistics item of its row, and a gradient item only waits for statistics items whose
    tickets were taken before its own, by programs already running them; statistics items never
    wait. So no grid size and no scheduling deadlocks, and a program that runs alone (the
    Triton interpreter runs programs one after another) takes every ticket itself.

    Args:
        ticket: the ticket (0 <= ticket < total).
        n_stats: statistics items, B * n_chunks.
        lag: ``split_lag``'s lag.

    Returns:
        tuple: ("S" or "G", item index).
    """
    after = ticket - lag
    paired = n_stats - lag
    if after < 0:
        return "S", ticket
    if after < 2 * paired:
        return ("S", lag + after // 2) if after % 2 else ("G", after // 2)
    return "G", after - paired


def split_column_bytes(logits, student_grad, teacher_grad):
    """Bytes a column of a split chunk moves while it must stay in L2 (``split_config``): both
    inputs, and each stored gradient asked for (fp32 for fp16 logits, whose stored gradient may be
    kept in fp32); 0 without gradients.

    Args:
        logits: (student, teacher) tensors.
        student_grad: whether the student's gradient is written.
        teacher_grad: whether the teacher's gradient is written.

    Returns:
        int: bytes.
    """
    if not (student_grad or teacher_grad):
        return 0
    stored = [4 if t.dtype == torch.float16 else t.element_size() for t in logits]
    return sum(t.element_size() for t in logits) + stored[0] * bool(student_grad) + stored[1] * bool(teacher_grad)


@functools.cache
def _multiprocessors(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessors(device):
    """Multiprocessors of ``device`` (DEFAULT_SMS for a CPU or meta device).

    Args:
        device: a torch.device.

    Returns:
        int: the SM count the plan fills.
    """
    if device.type != "cuda":
        return DEFAULT_SMS
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _l2_bytes(device_index):
    return torch.cuda.get_device_properties(device_index).L2_cache_size


def l2_budget(device):
    """L2 bytes the split form's working set may take on ``device``: SPLIT_L2_BUDGET, or a third
    of a smaller L2 (SPLIT_L2_BUDGET for a CPU or meta device).

    Args:
        device: a torch.device.

    Returns:
        int: bytes.
    """
    if device.type != "cuda":
        return SPLIT_L2_BUDGET
    index = device.index if device.index is not None else torch.cuda.current_device()
    return min(SPLIT_L2_BUDGET, _l2_bytes(index) // 3)


def choose_form(batch, num_classes, nbytes, sms=DEFAULT_SMS):
    """The launch form: the tile when C fits one and the rows alone give ``programs_wanted``
    programs (or the logits are under ONE_WAVE_BYTES, where one program per row is enough), else
    split rows.

    Args:
        batch: B.
        num_classes: C.
        nbytes: bytes of the larger input.
        sms: multiprocessors of the GPU.

    Returns:
        str: "tile" or "split".
    """
    if num_classes <= TILE_MAX_COLUMNS and (nbytes < ONE_WAVE_BYTES or batch >= programs_wanted(nbytes, sms)):
        return "tile"
    return "split"


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


def _check_weight(tensor, labels, length, device, name):
    """Validates one weight tensor's metadata (no device sync); returns it as fp32, contiguous, or None."""
    if tensor is None:
        return None
    if name == "weight" and labels is None:
        raise ValueError("weight is per class and needs labels")
    if tensor.dim() != 1 or tensor.shape[0] != length:
        what = "C" if name == "weight" else "B"
        raise ValueError(f"{name} must have shape ({what}={length},), got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")
    return tensor.to(torch.float32).contiguous()


def kd_kl_div_forward(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                      teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad,
                      teacher_grad, weight=None, sample_weight=None, sample_weight_scalar=1.0):
    """Row w_i * KL(softmax(t / tau_t) || softmax(s / tau_s)) and its gradients, by the Triton kernels.

    The implementation of ``torch.ops.fastabsld.kd_kl_div_forward`` on CUDA tensors (and on CPU
    tensors under the Triton interpreter). ``plan`` picks the launch form and configuration.

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
        weight: (C,) per-class row weights gathered by label (needs labels), or None.
        sample_weight: (B,) per-row weights, or None.
        sample_weight_scalar: a weight of every row. The row weight w_i is the product of the
            three (a tensor left None counts 1); it scales the row's loss and both gradients.
            Weights must be non-negative and finite (ValueError; tensor values are checked on
            CPU tensors only).

    Returns:
        tuple: row_loss (B,) fp32; grad_student (B, C) in the student's dtype, contiguous (or an
        empty (0,) tensor when not asked for); grad_teacher likewise for the teacher.
    """
    return launch(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                  teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad, teacher_grad,
                  weight=weight, sample_weight=sample_weight, sample_weight_scalar=sample_weight_scalar)


def device_asserts():
    """Whether launches compile the device asserts in (the opt-in debug mode).

    Off by default: a bad label or temperature then gives its row a NaN loss and NaN gradients
    (the documented behaviour, and no dead CUDA context). Set the environment variable
    ``FASTABSLD_DEVICE_ASSERTS=1`` before the first import to have a bad row fail the launch with
    the assert's message instead (each kernel then compiles once more, with the asserts in), or
    assign ``DEVICE_ASSERTS`` of this module at run time.

    Returns:
        bool: ``DEVICE_ASSERTS``.
    """
    return DEVICE_ASSERTS


def _aligned16(tensor):
    return tensor.data_ptr() % 16 == 0


@dataclasses.dataclass(eq=False)
class _Step:
    """One launch of a cached plan: the kernel, its grid and constexprs, how its arguments are bound
    from a call's values, and (after the first launch on a GPU) the compiled kernel to launch directly."""

    kernel: object
    grid: tuple
    constexprs: dict
    options: dict
    bind: object
    compiled: object = None
    tail: tuple = ()
    stream: object = None


@dataclasses.dataclass(eq=False)
class _StaticPlan:
    """What a call's metadata decides: the form, the launches and the split form's workspaces:
    ``partials`` fp32 values (uninitialised) and ``counters`` int32 values that must be zeros at
    each launch (``torch.zeros``: one fill launch per call, nothing kept on the device between calls)."""

    form: str
    steps: list
    partials: int = None
    counters: int = None


# Slots of the values a call binds into its launches' arguments (see ``_bind_values``).
S, T, LABELS, TAU_T, TAU_S, WEIGHT, SAMPLE_WEIGHT, ROWS, GRAD_S, GRAD_T, PARTIALS, OUT, \
    TAU_T_SCALAR, TAU_S_SCALAR, WEIGHT_SCALAR, COUNTERS = range(16)

_PLANS = {}
_GRADIENT_PLANS = {}
# Plans kept at most, per cache (cleared when full).
PLANS_KEPT = 512
_LABEL_STAND_INS = {}
_EMPTY = {}
REDUCE_BLOCK = 1024
SCALE_BLOCK = 1024
SCALE_MIN_BLOCK = 256


def _nothing(device, dtype):
    """An empty (0,) tensor, one per (device, dtype): the gradient not asked for (never written)."""
    key = (device, dtype)
    empty = _EMPTY.get(key)
    if empty is None:
        empty = _EMPTY[key] = torch.empty(0, dtype=dtype, device=device)
    return empty


def _label_stand_in(device):
    """An int64 tensor that stands in for labels not given (never read), one per device."""
    stand_in = _LABEL_STAND_INS.get(device)
    if stand_in is None:
        stand_in = _LABEL_STAND_INS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return stand_in


def _static_plan(student_logits, teacher_logits, labels, tau_t, tau_s, ignore_index, student_grad, teacher_grad,
                 has_weight, has_sample_weight, reduction, form=None, config=None, debug=False):
    """The launches (without their tensors and scalars) of a call with this metadata."""
    batch, num_classes = student_logits.shape
    device = student_logits.device
    logits = (student_logits, teacher_logits)
    steps = []
    partials = counters = None
    has_labels = labels is not None
    modes = tuple(SCALAR if tau is None else (BY_LABEL if has_labels else BY_ROW) for tau in (tau_t, tau_s))
    stride_l = labels.stride(0) if has_labels else 0
    per_row = (*modes, int(has_labels), int(ignore_index))
    weighting = (int(has_weight), int(has_sample_weight))
    flags = (int(bool(student_grad)), int(bool(teacher_grad)))
    strides = (*student_logits.stride(), *teacher_logits.stride(), stride_l)
    options = {"num_warps": 4, "num_stages": 1, "debug": debug, "sanitize_overflow": False}
    if batch > 0:
        nbytes = batch * num_classes * max(t.element_size() for t in logits)
        sms = multiprocessors(device)
        form = form or choose_form(batch, num_classes, nbytes, sms)
        vec = vector_width(num_classes, batch, logits)
        sizes = (batch, num_classes, *strides)
        if form == "tile":
            config = config or tile_config(batch, num_classes, sms, nbytes, vec)
            block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
            wide = max(_span(t, block_m, block_n) for t in logits) >= INT32_LIMIT or \
                block_m * num_classes >= INT32_LIMIT

            def bind(v):
                return (v[S], v[T], v[LABELS], v[TAU_T], v[TAU_S], v[WEIGHT], v[SAMPLE_WEIGHT], v[ROWS], v[GRAD_S],
                        v[GRAD_T], *sizes, v[TAU_T_SCALAR], v[TAU_S_SCALAR], *per_row, v[WEIGHT_SCALAR],
                        *weighting, *flags)

            steps.append(_Step(_kd_tile_kernel, (-(-batch // block_m),),
                               {"BLOCK_M": block_m, "BLOCK_N": block_n, "VEC": vec, "WIDE": wide},
                               dict(options, num_warps=config["num_warps"]), bind))
        elif form == "split":
            # -- split form (persistent kernel, reduction fused in) --
            gradients = bool(student_grad or teacher_grad)
            input_bytes = sum(t.element_size() for t in logits)
            config = config or split_config(batch, num_classes, sms, nbytes, vec,
                                            split_column_bytes(logits, student_grad, teacher_grad),
                                            l2_budget(device), input_bytes)
            block_n, chunk = config["BLOCK_N"], config["CHUNK"]
            blocks_per_chunk = chunk // block_n
            n_chunks = -(-(-(-num_classes // block_n)) // blocks_per_chunk)
            items = batch * n_chunks
            wide = max(_span(t, 1, n_chunks * chunk) for t in logits) >= INT32_LIMIT
            # cp.async stages need loads of at least 4 bytes; narrower ones are prefetched in registers.
            narrowest = min(t.element_size() * (vec if t.stride(1) == 1 else 1) for t in logits)
            prefetch = config["num_stages"] > 1 and narrowest < 4
            stages = 1 if prefetch else config["num_stages"]
            programs = config.get("PROGRAMS") or split_programs(
                config["num_warps"], split_shared_bytes(block_n, stages, input_bytes), sms)
            programs = min(programs, items)
            lag = split_lag(n_chunks, programs, items, gradients, config.get("LAG"))
            partials = N_PARTIALS * items + ROW_STATISTICS * batch
            counters = WORK_COUNTERS + batch
            fused = reduction is not None and reduction != "none"
            split_reduce = (float(num_classes if reduction == "mean" else 1),)
            chunking = (n_chunks, blocks_per_chunk, lag)

            def bind_split(v):
                # A fused reduction writes the loss to out and the backward's scale after the rows.
                return (v[S], v[T], v[LABELS], v[TAU_T], v[TAU_S], v[WEIGHT], v[SAMPLE_WEIGHT], v[PARTIALS],
                        v[COUNTERS], v[ROWS], v[GRAD_S], v[GRAD_T], v[OUT] if fused else v[ROWS], *sizes,
                        *chunking, v[TAU_T_SCALAR],
                        v[TAU_S_SCALAR], *per_row, v[WEIGHT_SCALAR], *weighting, *split_reduce)

            steps.append(_Step(_kd_split_kernel, (programs,),
                               {"BLOCK_N": block_n, "VEC": vec, "WIDE": wide, "NUM_STAGES": stages,
                                "PREFETCH": prefetch, "PART_BLOCK": PARTIAL_BLOCK, "REDUCE": fused,
                                "MEAN": reduction in ("mean", "batchmean"),
                                # 4 rows a thread: the reduction adds no registers to the item loop's
                                "REDUCE_BLOCK": min(REDUCE_BLOCK, 128 * config["num_warps"]),
                                # compiled in: the gradient items' loop holds only the gradients asked for
                                "STUDENT_GRAD": bool(student_grad), "TEACHER_GRAD": bool(teacher_grad)},
                               # ptxas holds the registers to what the grid assumed (it spills rather than exceed)
                               dict(options, num_warps=config["num_warps"], num_stages=stages,
                                    maxnreg=SPLIT_MAX_REGISTERS), bind_split))
            # -- end of the split form --
        else:
            raise ValueError(f"form must be 'tile' or 'split', got {form!r}")
    if reduction is not None and reduction != "none" and counters is None:  # the split kernel reduces itself
        mean = reduction in ("mean", "batchmean")
        divisor = float(num_classes if reduction == "mean" else 1)
        reduce_args = (batch, stride_l, int(has_labels), int(ignore_index), divisor)

        def bind_reduce(v):
            return (v[ROWS], v[LABELS], v[OUT], *reduce_args)

        steps.append(_Step(_kd_reduce_kernel, (1,), {"MEAN": mean, "BLOCK": REDUCE_BLOCK}, options, bind_reduce))
    return _StaticPlan(form or "tile", steps, partials, counters)


def _no_launch_hooks():
    """True when no launch hook (a profiler's) is installed: none, or an empty chain of them."""
    hook = triton.knobs.runtime.launch_enter_hook
    return hook is None or (isinstance(hook, HookChain) and not hook.calls)


def _run(step, args, direct):
    """Launches one step: straight through the compiled kernel's launcher once it is known (the
    host path of a GPU call; ``direct``: no launch hook wants Triton's own path), else through
    ``kernel[grid]`` (the first time, in the interpreter, or for a profiler's hooks)."""
    compiled = step.compiled
    if compiled is not None and direct:
        compiled.run(step.grid[0], 1, 1, step.stream(), compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *step.tail)
        return
    result = step.kernel[step.grid](*args, **step.constexprs, **step.options)
    if isinstance(result, CompiledKernel):
        active = triton_driver.active
        step.stream = functools.partial(active.get_current_stream, active.get_current_device())
        step.tail = tuple(step.constexprs[name] for name in step.kernel.arg_names[len(args):])
        step.compiled = result


def _run_steps(steps, values, device):
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        # Triton launches on the current CUDA device: make it the tensors' one.
        with torch.cuda.device(device):
            for step in steps:
                step.kernel[step.grid](*step.bind(values), **step.constexprs, **step.options)
        return
    direct = _no_launch_hooks()
    for step in steps:
        _run(step, step.bind(values), direct)


def _plan_key(student_logits, teacher_logits, labels, tau_t, tau_s, weight, sample_weight, ignore_index,
              student_grad, teacher_grad, reduction, grad_dtypes, debug):
    """Everything a plan and its compiled variants depend on: shapes, strides, dtypes, 16-byte
    alignment of the inputs, the arguments' presence, flags, device."""
    return (student_logits.device, student_logits.shape, student_logits.stride(), teacher_logits.stride(),
            student_logits.dtype, teacher_logits.dtype, _aligned16(student_logits), _aligned16(teacher_logits),
            None if labels is None else (labels.stride(0), _aligned16(labels)),
            None if tau_t is None else _aligned16(tau_t), None if tau_s is None else _aligned16(tau_s),
            None if weight is None else _aligned16(weight),
            None if sample_weight is None else _aligned16(sample_weight),
            ignore_index, student_grad, teacher_grad, reduction, grad_dtypes, debug)


@dataclasses.dataclass(eq=False)
class EagerPlan:
    """The eager path's plan for calls with one metadata: the launches and the outputs they fill.

    ``run`` allocates the outputs and launches; nothing else happens per call.
    """

    static: _StaticPlan
    device: torch.device
    shape: tuple
    grad_dtypes: tuple
    student_grad: bool
    teacher_grad: bool
    reduced: bool

    def __post_init__(self):
        # Empty tensors of the outputs' dtypes on the device: ``new_empty`` with integer sizes is
        # the cheapest allocation call (no dtype or device arguments to parse).
        self._float = _nothing(self.device, torch.float32)
        self._int = _nothing(self.device, torch.int32)
        self._grads = tuple(_nothing(self.device, dtype) for dtype in self.grad_dtypes)
        self._steps = self.static.steps
        self._partials = self.static.partials
        self._counters = self.static.counters

    def run(self, student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
            teacher_temperature_scalar, student_temperature_scalar, weight, sample_weight, sample_weight_scalar):
        """The loss of one call (tensors with this plan's metadata), reduced on the device.

        Args:
            as ``loss`` (without the metadata the plan fixed).

        Returns:
            tuple: as ``loss``.
        """
        batch, num_classes = self.shape
        empty_s, empty_t = self._grads
        # A reduced loss's rows get one more value: the backward's scale, written by the reduction.
        rows = self._float.new_empty(batch + 1 if self.reduced else batch)
        grad_s = empty_s.new_empty(batch, num_classes) if self.student_grad else empty_s
        grad_t = empty_t.new_empty(batch, num_classes) if self.teacher_grad else empty_t
        partials = self._partials
        if partials is not None:
            partials = self._float.new_empty(partials)
        counters = self._counters
        if counters is not None:  # the split form's tickets and row counts start at zero in every call
            counters = self._int.new_zeros(counters)
        out = self._float.new_empty(()) if self.reduced else None
        # A tensor not given is never read: the row losses stand in for its pointer.
        values = (student_logits, teacher_logits, _label_stand_in(self.device) if labels is None else labels,
                  rows if teacher_temperature is None else teacher_temperature,
                  rows if student_temperature is None else student_temperature,
                  rows if weight is None else weight, rows if sample_weight is None else sample_weight, rows, grad_s,
                  grad_t, partials, out, teacher_temperature_scalar, student_temperature_scalar, sample_weight_scalar,
                  counters)
        _run_steps(self._steps, values, self.device)
        if out is None:
            return rows, grad_s, grad_t, None
        return out, grad_s, grad_t, rows


def eager_plan(student_logits, teacher_logits, labels, teacher_temperature, student_temperature, weight,
               sample_weight, ignore_index, student_grad, teacher_grad, reduction, grad_dtypes):
    """The cached ``EagerPlan`` of calls with these arguments' metadata (built on first use).

    Args:
        as ``loss`` (tensors are read for their metadata only).

    Returns:
        EagerPlan.
    """
    debug = device_asserts()
    key = _plan_key(student_logits, teacher_logits, labels, teacher_temperature, student_temperature, weight,
                    sample_weight, ignore_index, student_grad, teacher_grad, reduction, grad_dtypes, debug)
    found = _PLANS.get(key)
    if found is None:
        if len(_PLANS) >= PLANS_KEPT:  # shapes that change every call would otherwise grow it without bound
            _PLANS.clear()
        static = _static_plan(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                              ignore_index, student_grad, teacher_grad, weight is not None, sample_weight is not None,
                              reduction, debug=debug)
        found = _PLANS[key] = EagerPlan(static, student_logits.device, tuple(student_logits.shape), grad_dtypes,
                                        bool(student_grad), bool(teacher_grad), reduction != "none")
    return found


def loss(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
         teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad, teacher_grad,
         weight, sample_weight, sample_weight_scalar, reduction, grad_dtypes):
    """The eager loss: row losses and gradients, reduced on the device, from a cached plan.

    Trusts its caller (the public function checked the arguments): fp32/fp16/bf16 (B, C) logits,
    int64 labels or None, fp32 temperatures and weights in the launcher's terms (a temperature
    (C,) with labels, (B,) without), number temperatures positive and finite. At most two
    launches for a reduced loss (tile + reduce; the split form's zeroed workspace + its kernel)
    and nothing else on the device: scalars stay Python numbers.

    Args:
        student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
        teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad,
        teacher_grad, weight, sample_weight, sample_weight_scalar: as for ``kd_kl_div_forward``.
        reduction: "none", "sum", "batchmean" or "mean".
        grad_dtypes: (student, teacher) dtypes the stored gradients are kept in (fp32 for fp16
            logits keeps what fp16 would flush towards 0 until ``scale_gradient`` scales it).

    Returns:
        tuple: (loss: 0-d fp32, or the (B,) row losses for "none"; grad_student; grad_teacher
        (each (B, C) in its grad dtype or an empty (0,) tensor); scale: for a reduced loss the
        (B + 1,) fp32 row buffer whose last value is the factor the backward applies, or None
        for "none").
    """
    found = eager_plan(student_logits, teacher_logits, labels, teacher_temperature, student_temperature, weight,
                       sample_weight, ignore_index, student_grad, teacher_grad, reduction, grad_dtypes)
    return found.run(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
                     teacher_temperature_scalar, student_temperature_scalar, weight, sample_weight,
                     sample_weight_scalar)


def scale_gradient(grad, grad_output, scale, dtype):
    """The backward of ``loss``: the stored gradient times grad_output, in one launch.

    Args:
        grad: a stored gradient (B, C), contiguous.
        grad_output: the incoming gradient: 0-d for a reduced loss, (B,) (any stride) for "none".
        scale: the (B + 1,) buffer ``loss`` returned (the factor at [B]), or None for "none".
        dtype: the logits' dtype, the gradient's.

    Returns:
        Tensor: (B, C) in ``dtype``, computed in fp32.
    """
    device = grad.device
    per_row = scale is None
    stride = grad_output.stride(0) if per_row else 0
    key = (device, grad.shape, grad.dtype, dtype, stride, grad_output.dtype, _aligned16(grad_output))
    step = _GRADIENT_PLANS.get(key)
    if step is None:
        if len(_GRADIENT_PLANS) >= PLANS_KEPT:
            _GRADIENT_PLANS.clear()
        step = _GRADIENT_PLANS[key] = _scale_step(grad, per_row, stride)
    out = torch.empty(grad.shape, dtype=dtype, device=device)
    if grad.numel():
        _run_steps((step,), (grad, out, grad_output, grad_output if scale is None else scale), device)
    return out


def _scale_step(grad, per_row, stride):
    """The backward's launch for a stored gradient of this shape (``per_row``: grad_output is (B,))."""
    numel = grad.numel()
    # The reduced loss's scale sits after its B rows.
    fixed = (numel, grad.shape[1] if grad.dim() == 2 else 1, stride, grad.shape[0] if grad.dim() == 2 else 0)
    # SCALE_BLOCK elements a program, fewer (down to SCALE_MIN_BLOCK) where that leaves under two
    # programs per multiprocessor; 8 elements a thread.
    block = SCALE_BLOCK
    while block > SCALE_MIN_BLOCK and numel < 2 * multiprocessors(grad.device) * block:
        block //= 2

    def bind(v):
        return (v[0], v[1], v[2], v[3], *fixed)

    return _Step(_kd_scale_kernel, (max(1, -(-numel // block)),),
                 {"PER_ROW": per_row, "BLOCK": block, "WIDE": numel + block >= INT32_LIMIT},
                 {"num_warps": max(1, block // 256), "num_stages": 1, "debug": False, "sanitize_overflow": False},
                 bind)


def scale_plan(grad, grad_output, scale, dtype):
    """The launch ``scale_gradient`` makes, as a ``Launch`` (for ahead-of-time compiles and the model).

    Args:
        as ``scale_gradient``.

    Returns:
        list: one ``Launch`` (none for an empty gradient).
    """
    per_row = scale is None
    step = _scale_step(grad, per_row, grad_output.stride(0) if per_row else 0)
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    if not grad.numel():
        return []
    return [Launch(step.kernel, step.grid, step.bind((grad, out, grad_output, grad_output if per_row else scale)),
                   step.constexprs, step.options["num_warps"], step.options["num_stages"], False)]


def launch(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
           teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad, teacher_grad,
           form=None, config=None, weight=None, sample_weight=None, sample_weight_scalar=1.0):
    """``kd_kl_div_forward`` with the launch form and its configuration open.

    Args:
        student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
        teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad,
        teacher_grad: as for ``kd_kl_div_forward``.
        form: "tile" or "split" forces the form; None lets ``choose_form`` pick.
        config: a dict replacing the form's default configuration (``tile_config`` or
            ``split_config``: for tests that exercise several programs at small sizes).
        weight, sample_weight, sample_weight_scalar: as for ``kd_kl_div_forward``.

    Returns:
        tuple: row_loss, grad_student, grad_teacher as for ``kd_kl_div_forward``.
    """
    args = (student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
            teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad, teacher_grad)
    if form is None and config is None:
        checked = _checked(*args, weight, sample_weight, sample_weight_scalar)
        grad_dtypes = (student_logits.dtype, teacher_logits.dtype)
        rows, grad_s, grad_t, _ = loss(*checked, "none", grad_dtypes)
        # The op's outputs are its own: not the shared empty tensor that stands for a gradient not asked for.
        return (rows, grad_s if student_grad else student_logits.new_empty((0,)),
                grad_t if teacher_grad else teacher_logits.new_empty((0,)))
    outputs, launches = plan(*args, form, config, weight, sample_weight, sample_weight_scalar)
    device = student_logits.device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for step in launches:
            step.run()
    return outputs


def _checked(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
             teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad, teacher_grad,
             weight, sample_weight, sample_weight_scalar):
    """The op's arguments checked (metadata only, values on CPU tensors) and in the launcher's terms."""
    _check_inputs(student_logits, teacher_logits, labels)
    batch, num_classes = student_logits.shape
    device = student_logits.device
    tau_t, _ = _check_temperature(teacher_temperature, teacher_temperature_scalar, labels, batch, num_classes, device,
                                  "teacher_temperature")
    tau_s, _ = _check_temperature(student_temperature, student_temperature_scalar, labels, batch, num_classes, device,
                                  "student_temperature")
    weight = _check_weight(weight, labels, num_classes, device, "weight")
    sample_weight = _check_weight(sample_weight, labels, batch, device, "sample_weight")
    if not (math.isfinite(sample_weight_scalar) and sample_weight_scalar >= 0):
        raise ValueError(f"kd_kl_div_forward: sample_weight_scalar must be non-negative and finite, "
                         f"got {sample_weight_scalar}")
    if device.type == "cpu" and not torch.compiler.is_compiling():  # the interpreter's stand-in for asserts
        check_values(labels, [("teacher_temperature", tau_t), ("student_temperature", tau_s)],
                     [("weight", weight), ("sample_weight", sample_weight)], ignore_index, num_classes)
    return (student_logits, teacher_logits, labels, tau_t, tau_s, float(teacher_temperature_scalar),
            float(student_temperature_scalar), int(ignore_index), bool(student_grad), bool(teacher_grad), weight,
            sample_weight, float(sample_weight_scalar))


def plan(student_logits, teacher_logits, labels, teacher_temperature, student_temperature,
         teacher_temperature_scalar, student_temperature_scalar, ignore_index, student_grad, teacher_grad,
         form=None, config=None, weight=None, sample_weight=None, sample_weight_scalar=1.0, reduction=None,
         grad_dtypes=None):
    """Validates the arguments, allocates the outputs and returns the launches that compute them.

    Runs nothing on the device (meta tensors give the launches a real call would make, for
    ahead-of-time compiles and the performance model). The split form's work counters are
    zeroed here: its launch runs once (a second run would find every ticket taken).

    Args:
        as for ``launch``; reduction: None (the op: row losses) or one of ``loss``'s reductions,
        whose finishing launch is then included; grad_dtypes: the stored gradients' (student,
        teacher) dtypes, None for the logits'.

    Returns:
        tuple: (row_loss, grad_student, grad_teacher) (not yet computed) and a list of ``Launch``.
    """
    (student_logits, teacher_logits, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, ignore_index, student_grad,
     teacher_grad, weight, sample_weight, sample_weight_scalar) = _checked(
        student_logits, teacher_logits, labels, teacher_temperature, student_temperature, teacher_temperature_scalar,
        student_temperature_scalar, ignore_index, student_grad, teacher_grad, weight, sample_weight,
        sample_weight_scalar)
    debug = device_asserts()
    static = _static_plan(student_logits, teacher_logits, labels, tau_t, tau_s, ignore_index, student_grad,
                          teacher_grad, weight is not None, sample_weight is not None, reduction, form, config, debug)
    batch, num_classes = student_logits.shape
    device = student_logits.device
    grad_dtypes = grad_dtypes or (student_logits.dtype, teacher_logits.dtype)
    reduced = reduction not in (None, "none")
    row_loss = torch.empty(batch + 1 if reduced else batch, dtype=torch.float32, device=device)
    grad_student = torch.empty((batch, num_classes) if student_grad else (0,), dtype=grad_dtypes[0], device=device)
    grad_teacher = torch.empty((batch, num_classes) if teacher_grad else (0,), dtype=grad_dtypes[1], device=device)
    partials = None if static.partials is None else torch.empty(static.partials, dtype=torch.float32, device=device)
    # zeroed here: the plan's launches run once
    counters = None if static.counters is None else torch.zeros(static.counters, dtype=torch.int32, device=device)
    labels_arg = torch.zeros(1, dtype=torch.int64, device=device) if labels is None else labels
    out = torch.empty((), device=device) if reduced else None
    values = (student_logits, teacher_logits, labels_arg, row_loss if tau_t is None else tau_t,
              row_loss if tau_s is None else tau_s, row_loss if weight is None else weight,
              row_loss if sample_weight is None else sample_weight, row_loss, grad_student, grad_teacher, partials,
              out, tau_t_scalar, tau_s_scalar, sample_weight_scalar, counters)
    launches = [Launch(step.kernel, step.grid, step.bind(values), step.constexprs, step.options["num_warps"],
                       step.options["num_stages"], debug, step.options.get("maxnreg")) for step in static.steps]
    return (row_loss, grad_student, grad_teacher), launches


def _span(tensor, rows, cols):
    """Largest element offset a (rows, cols) block of ``tensor`` spans from its first element."""
    return (rows - 1) * abs(tensor.stride(0)) + (cols - 1) * abs(tensor.stride(1))
