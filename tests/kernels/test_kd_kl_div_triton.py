"""The Triton KD forward (kernels/kd_kl_div.py) against fastabsld.reference.kd_kl_div.

Runs on CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
without a GPU): both launch forms (tile; split rows with its one persistent kernel) at small
shapes with forced small configurations, so that several programs, several chunks per row and
partial last blocks are exercised at a few programs each; unweighted and with row weights (per
class, per row, a number, and all three). The split kernel's ticket sequence is checked as a
function of its plan (every item once, every gradient item after its row's statistics), on the
host and on the device, and its grid sizes and lags against the reference, with its fused
reduction. The interpreter runs programs one after another: its first program takes every
ticket. The launch plan (form, grid, vector width) is checked without running anything.
Ahead-of-time compiles: test_kd_kl_div_aot.py.
"""

import dataclasses
import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from fastabsld import reference
from fastabsld.kernels import kd_kl_div as kd
from tests.conftest import HAS_GPU, triton_device

DEVICE = triton_device()
IGNORE = -100
FORMS = ["tile", "split"]
# Split rows at 16-column blocks, two blocks a chunk: C = 33..64 gives 2 chunks, 65.. more.
SPLIT_SMALL = {"BLOCK_N": 16, "CHUNK": 32, "num_warps": 1, "num_stages": kd.SPLIT_STAGES}


def tile_small(num_classes):
    """A tile of 4 rows: several programs at a handful of rows."""
    return {"BLOCK_M": 4, "BLOCK_N": 1 << max(0, (num_classes - 1).bit_length()), "num_warps": 1}


def small_config(form, num_classes):
    return tile_small(num_classes) if form == "tile" else SPLIT_SMALL


def make_logits(batch, num_classes, dtype, layout="contiguous", scale=3.0, generator=None):
    """(B, C) random logits in ``dtype`` and the given memory layout."""
    shape = {"transposed": (num_classes, batch), "column-slice": (batch, 2 * num_classes),
             "row-slice": (2 * batch, num_classes), "offset": (batch * num_classes + 1,)}.get(layout,
                                                                                               (batch, num_classes))
    base = (torch.randn(shape, generator=generator) * scale).to(dtype).to(DEVICE)
    if layout == "transposed":
        return base.t()
    if layout == "column-slice":
        return base[:, 1::2]
    if layout == "row-slice":
        return base[::2]
    if layout == "offset":  # contiguous rows, but the first element is not 16-byte aligned
        return base[1:].view(batch, num_classes)
    return base


def temperatures(kind, batch, num_classes, low=0.5, high=3.0, generator=None):
    """(labels, teacher tensor or None, student tensor or None, teacher scalar, student scalar)."""
    def draw(n):
        return (low + (high - low) * torch.rand(n, generator=generator)).to(DEVICE)

    labels = torch.randint(0, num_classes, (2 * batch,), generator=generator).to(DEVICE)[::2]  # strided
    if kind == "scalar":
        return None, None, None, 2.0, 0.7
    if kind == "scalar-labels":
        return labels, None, None, 1.5, 1.0
    if kind == "class":
        return labels, draw(num_classes), None, 1.0, 1.3
    if kind == "class-both":
        return labels, draw(num_classes), draw(num_classes), 1.0, 1.0
    if kind == "row":
        return None, draw(batch), draw(batch), 1.0, 1.0
    raise ValueError(kind)


def reference_outputs(s, t, labels, tau_t, tau_s, scalar_t, scalar_s, ignore_index=IGNORE):
    """Reference row loss and its gradients (rows are independent: grad of the rows' sum)."""
    s = s.detach().float().requires_grad_()
    t = t.detach().float().requires_grad_()
    if labels is None:  # the launcher's per-row temperatures are (B,); the reference's are (B, 1)
        tau_t, tau_s = (None if tau is None else tau[:, None] for tau in (tau_t, tau_s))
    rows = reference.kd_kl_div(s, t, labels, scalar_t if tau_t is None else tau_t,
                               scalar_s if tau_s is None else tau_s, "none", ignore_index)
    grad_s, grad_t = torch.autograd.grad(rows.sum(), (s, t))
    return rows.detach(), grad_s, grad_t


def assert_matches(outputs, expected, s, t, tau_t, tau_s, scalar_t, scalar_s, weight_scale=1.0):
    """Compares (row_loss, grad_s, grad_t) with tolerances set by dtype, logit scale and the largest row weight."""
    row_loss, grad_s, grad_t = outputs
    ref_loss, ref_s, ref_t = expected
    inv = [1.0 / (scalar if tau is None else float(tau.min())) for tau, scalar in ((tau_t, scalar_t), (tau_s, scalar_s))]
    finite = [x.float()[torch.isfinite(x.float())] for x in (t, s)]
    logit_scale = 1.0 + max(float(f.abs().max()) * i if f.numel() else 0.0 for f, i in zip(finite, inv))
    atol = 4e-6 * logit_scale * max(1.0, weight_scale)
    assert row_loss.dtype == torch.float32 and row_loss.shape == ref_loss.shape
    torch.testing.assert_close(row_loss, ref_loss, rtol=1e-4, atol=atol)
    for grad, ref, logits, inverse in ((grad_s, ref_s, s, inv[1]), (grad_t, ref_t, t, inv[0])):
        assert grad.dtype == logits.dtype and grad.shape == logits.shape and grad.is_contiguous()
        rounding = 0.0 if logits.dtype == torch.float32 else torch.finfo(logits.dtype).eps
        torch.testing.assert_close(grad.float(), ref, rtol=2 * rounding + 1e-4,
                                   atol=(atol + rounding * float(ref.abs().max())) * inverse)


def run_case(s, t, kind, form=None, config=None, generator=None, low=0.5, high=3.0):
    batch, num_classes = s.shape
    labels, tau_t, tau_s, scalar_t, scalar_s = temperatures(kind, batch, num_classes, low, high, generator)
    if labels is not None:
        labels[::3] = IGNORE
    s_before, t_before = s.clone(), t.clone()
    outputs = kd.launch(s, t, labels, tau_t, tau_s, scalar_t, scalar_s, IGNORE, True, True, form=form, config=config)
    assert torch.equal(s, s_before) and torch.equal(t, t_before), "the kernel wrote into its inputs"
    expected = reference_outputs(s.cpu(), t.cpu(), None if labels is None else labels.cpu(),
                                 None if tau_t is None else tau_t.cpu(), None if tau_s is None else tau_s.cpu(),
                                 scalar_t, scalar_s)
    assert_matches([x.cpu() for x in outputs], expected, s.cpu(), t.cpu(), tau_t, tau_s, scalar_t, scalar_s)
    if labels is not None:
        ignored = labels.cpu() == IGNORE
        assert (outputs[0].cpu()[ignored] == 0).all() and (outputs[1].cpu()[ignored] == 0).all()
    return outputs


@pytest.fixture
def few_sms(monkeypatch):
    """Plans for a 4-SM GPU: what a call picks by itself, at a few programs (the interpreter is slow)."""
    monkeypatch.setattr(kd, "DEFAULT_SMS", 4)


# (B, C, temperature kind): not every combination; C > 1 everywhere but one case.
SHAPES = [(1, 1, "scalar"), (3, 2, "class"), (128, 10, "class-both"), (257, 10, "row"), (3, 100, "scalar-labels"),
          (128, 100, "class"), (3, 1000, "row"), (1, 1000, "class")]


@pytest.mark.parametrize("batch,num_classes,kind", SHAPES)
def test_default_plan_matches_reference(few_sms, batch, num_classes, kind):
    """What a call picks by itself (the tile form at these sizes; several rows a program from B = 8)."""
    g = torch.Generator().manual_seed(batch * 1000 + num_classes)
    run_case(make_logits(batch, num_classes, torch.float32, generator=g),
             make_logits(batch, num_classes, torch.float32, generator=g), kind, generator=g)


@pytest.mark.parametrize("batch,num_classes,kind", [(9, 37, "class-both"), (6, 100, "row"), (13, 16, "scalar-labels"),
                                                    (2, 5, "class")])
def test_tile_kernel_several_programs(batch, num_classes, kind):
    """4-row tiles: several programs, a partial last one, columns padded in registers."""
    g = torch.Generator().manual_seed(3 + num_classes)
    run_case(make_logits(batch, num_classes, torch.float32, generator=g),
             make_logits(batch, num_classes, torch.float32, generator=g), kind, form="tile",
             config=tile_small(num_classes), generator=g)


@pytest.mark.parametrize("batch,num_classes,kind,chunk", [(5, 1, "class", 32), (9, 37, "class-both", 32),
                                                          (6, 100, "row", 32), (4, 100, "scalar-labels", 16),
                                                          (3, 100, "class", 128), (2, 257, "scalar", 64)])
def test_split_kernels_match_reference(batch, num_classes, kind, chunk):
    """Rows split in chunks of 16-column blocks: one to 17 chunks a row, partial last blocks and chunks."""
    g = torch.Generator().manual_seed(7 + num_classes + chunk)
    run_case(make_logits(batch, num_classes, torch.float32, generator=g),
             make_logits(batch, num_classes, torch.float32, generator=g), kind, form="split",
             config=dict(SPLIT_SMALL, CHUNK=chunk), generator=g)


@pytest.mark.parametrize("stages", [1, kd.SPLIT_STAGES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_loop_forms(dtype, stages):
    """The column loop staged (cp.async on a GPU), unstaged, and prefetched in registers (bf16 at odd C)."""
    g = torch.Generator().manual_seed(23)
    s, t = make_logits(5, 75, dtype, generator=g), make_logits(5, 75, dtype, generator=g)
    config = dict(SPLIT_SMALL, num_stages=stages)
    _, launches = kd.plan(s, t, None, None, None, 1.0, 1.0, IGNORE, True, True, "split", config)
    assert launches[0].constexprs["PREFETCH"] == (dtype == torch.bfloat16 and stages > 1)
    run_case(s, t, "class", form="split", config=config, generator=g)


def test_split_is_deterministic_and_chunking_only_rounds():
    """The same bits run to run; other chunkings agree with it to rounding."""
    g = torch.Generator().manual_seed(29)
    s, t = make_logits(2, 100, torch.float32, generator=g), make_logits(2, 100, torch.float32, generator=g)
    labels, tau_t, tau_s, scalar_t, scalar_s = temperatures("class", 2, 100, generator=g)
    args = (s, t, labels, tau_t, tau_s, scalar_t, scalar_s, IGNORE, True, True)
    first = kd.launch(*args, form="split", config=SPLIT_SMALL)
    again = kd.launch(*args, form="split", config=SPLIT_SMALL)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    for chunk in (16, 128):
        other = kd.launch(*args, form="split", config=dict(SPLIT_SMALL, CHUNK=chunk))
        for x, y in zip(first, other):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# The split kernel's schedule: tickets and items, grid sizes, lags, and its fused reduction.

def _schedule(batch, n_chunks, lag, gradients=True):
    """The items of every ticket, in ticket order, as the plan's ``split_item`` gives them."""
    n_stats = batch * n_chunks
    lag = kd.split_lag(n_chunks, 1, n_stats, gradients, lag)
    return [kd.split_item(ticket, n_stats, lag) for ticket in range(2 * n_stats if gradients else n_stats)], lag


@settings(max_examples=300, deadline=None)
@given(batch=st.integers(1, 40), n_chunks=st.integers(1, 40), extra=st.integers(0, 3000), gradients=st.booleans())
def test_split_tickets_give_every_item_once_and_each_gradient_after_its_row(batch, n_chunks, extra, gradients):
    """Statistics items once each in row-major order, gradient items once each, and each gradient
    item's ticket after every statistics ticket of its row (so a gradient item only waits for
    items already handed out), at least lag - n_chunks + 1 tickets after the last one."""
    sequence, lag = _schedule(batch, n_chunks, n_chunks + extra, gradients)
    n_stats = batch * n_chunks
    assert [item for kind, item in sequence if kind == "S"] == list(range(n_stats))
    assert [item for kind, item in sequence if kind == "G"] == (list(range(n_stats)) if gradients else [])
    ticket = {entry: position for position, entry in enumerate(sequence)}
    gaps = [ticket[("G", item)] - max(ticket[("S", item // n_chunks * n_chunks + chunk)] for chunk in range(n_chunks))
            for item in range(n_stats if gradients else 0)]
    assert min(gaps, default=lag - n_chunks + 1) == lag - n_chunks + 1


def test_split_lag_below_the_chunks_is_refused():
    with pytest.raises(ValueError, match="lag must be at least the chunks per row"):
        kd.split_lag(4, 8, 40, True, 3)
    assert kd.split_lag(4, 8, 40, False, 3) == 40  # no gradient items: nothing trails


@triton.jit
def _device_items(out_ptr, total, n_stats, lag, BLOCK: tl.constexpr):
    tickets = tl.arange(0, BLOCK)
    is_stats, item = kd._split_item(tickets, n_stats, lag)
    mask = tickets < total
    tl.store(out_ptr + 2 * tickets, is_stats.to(tl.int32), mask=mask)
    tl.store(out_ptr + 2 * tickets + 1, item, mask=mask)


@pytest.mark.parametrize("batch,n_chunks,lag,gradients", [(5, 3, 3, True), (5, 3, 7, True), (2, 4, 100, True),
                                                          (6, 1, 1, True), (3, 5, None, False)])
def test_split_item_on_the_device_is_the_plans(batch, n_chunks, lag, gradients):
    """The kernel's ticket decoding (``_split_item``) gives the items ``split_item`` gives."""
    sequence, lag = _schedule(batch, n_chunks, lag, gradients)
    out = torch.full((2 * len(sequence),), -1, dtype=torch.int32, device=DEVICE)
    _device_items[(1,)](out, len(sequence), batch * n_chunks, lag, BLOCK=64)
    assert [("S" if kind else "G", item) for kind, item in out.view(-1, 2).tolist()] == sequence


@pytest.mark.parametrize("programs,lag", [(1, None), (3, 3), (64, 5), (2, 10_000)])
def test_split_grid_and_lag_change_no_bit(programs, lag):
    """Any grid and any lag of at least n_chunks (3 here) give the reference's rows and gradients,
    bit for bit the same: chunks are combined in chunk order whoever computed them. (In the
    interpreter the first program takes every ticket; the others find none left.)"""
    g = torch.Generator().manual_seed(53)
    s, t = make_logits(5, 70, torch.float32, generator=g), make_logits(5, 70, torch.bfloat16, generator=g)
    outputs = run_case(s, t, "class", form="split", config=dict(SPLIT_SMALL, PROGRAMS=programs, LAG=lag),
                       generator=torch.Generator().manual_seed(1))
    default = run_case(s, t, "class", form="split", config=SPLIT_SMALL, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(outputs, default))


@pytest.mark.parametrize("everything_ignored", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("form", FORMS)
def test_reduction_in_the_plan(form, reduction, everything_ignored):
    """The reduced loss and the backward's factor 1 / (kept rows * per_row) (1 for "sum"), after the
    rows in their buffer: fused
    into the split kernel (its last program), a finishing kernel after the tile; none for "none".
    With every row ignored the loss is 0 and one row counts (no 0 / 0)."""
    g = torch.Generator().manual_seed(59)
    s, t = make_logits(7, 45, torch.float32, generator=g), make_logits(7, 45, torch.float32, generator=g)
    labels, tau_t, _, scalar_t, scalar_s = temperatures("class", 7, 45, generator=g)
    labels[::3] = IGNORE
    if everything_ignored:
        labels[:] = IGNORE
    (rows, _, _), launches = kd.plan(s, t, labels, tau_t, None, scalar_t, scalar_s, IGNORE, True, False, form,
                                     small_config(form, 45), reduction=reduction)
    kernels = [launch.kernel for launch in launches]
    if form == "split":
        assert kernels == [kd._kd_split_kernel] and launches[0].constexprs["REDUCE"] == (reduction != "none")
    else:
        assert kernels == [kd._kd_tile_kernel] + ([kd._kd_reduce_kernel] if reduction != "none" else [])
    for launch in launches:
        launch.run()
    ref_rows = reference.kd_kl_div(s.cpu().double(), t.cpu().double(), labels.cpu(), tau_t.cpu().double(), scalar_s,
                                   "none", IGNORE)
    # A reduced loss's row buffer holds B + 1 values: the rows, then the backward's factor.
    assert rows.shape == ((7,) if reduction == "none" else (8,))
    torch.testing.assert_close(rows[:7].cpu().double(), ref_rows, rtol=1e-5, atol=1e-6)
    if reduction == "none":
        return
    args = dict(zip(launches[-1].kernel.arg_names, launches[-1].args))
    out, scale = args["out_ptr"].cpu(), rows[7].cpu()
    ref = reference.kd_kl_div(s.cpu().double(), t.cpu().double(), labels.cpu(), tau_t.cpu().double(), scalar_s,
                              reduction, IGNORE)
    kept = max(1, int((labels != IGNORE).sum()))
    factor = 1.0 if reduction == "sum" else 1.0 / (kept * (45 if reduction == "mean" else 1))
    assert float(scale) == pytest.approx(factor, rel=1e-6)
    torch.testing.assert_close(out.double().reshape(()), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape,dtype,grads", [((64, 262144), torch.float32, (True, False)),
                                               ((4096, 32000), torch.float32, (True, False)),
                                               ((64, 262144), torch.bfloat16, (True, True)),
                                               ((8, 32000), torch.float16, (True, False)),
                                               ((4096, 8193), torch.float32, (True, True))])
def test_split_plan_keeps_the_reread_in_l2(shape, dtype, grads):
    """The plan's chunk keeps what passes through L2 between a chunk's read and its re-read within
    SPLIT_L2_BUDGET, the lag at least n_chunks, and the grid one full set of resident programs."""
    logits = torch.empty(*shape, dtype=dtype, device="meta")
    (launch,) = kd.plan(logits, logits, None, None, None, 1.0, 1.0, IGNORE, *grads)[1]
    args = dict(zip(launch.kernel.arg_names, launch.args))
    chunk = args["blocks_per_chunk"] * launch.constexprs["BLOCK_N"]
    column_bytes = kd.split_column_bytes((logits, logits), *grads)
    assert column_bytes == 2 * dtype.itemsize + sum(grads) * (4 if dtype == torch.float16 else dtype.itemsize)
    assert kd.split_working_set(args["lag"], launch.grid[0], chunk, column_bytes) <= kd.SPLIT_L2_BUDGET
    assert args["lag"] >= args["n_chunks"]
    shared = kd.split_shared_bytes(launch.constexprs["BLOCK_N"], launch.num_stages, 2 * dtype.itemsize)
    assert launch.grid[0] == min(kd.split_programs(launch.num_warps, shared), shape[0] * args["n_chunks"])


def test_split_config_shrinks_the_chunk_to_the_l2_budget():
    """A smaller L2 (``l2_budget`` of a smaller GPU) gives smaller chunks, down to SPLIT_MIN_CHUNK;
    without gradients nothing is re-read and the budget does not bind."""
    chunks = []
    for budget in (64 << 20, 16 << 20, 4 << 20, 1 << 20, 64 << 10):
        config = kd.split_config(4096, 32000, l2_budget=budget)
        assert config["LAG"] == -(-32000 // config["CHUNK"]) + config["PROGRAMS"]
        working = kd.split_working_set(config["LAG"], config["PROGRAMS"], config["CHUNK"], 12)
        assert working <= budget or config["CHUNK"] == kd.SPLIT_MIN_CHUNK
        chunks.append(config["CHUNK"])
    assert chunks == sorted(chunks, reverse=True) and chunks[0] > chunks[-1] == kd.SPLIT_MIN_CHUNK
    assert kd.split_config(4096, 32000, column_bytes=0, l2_budget=64 << 10)["CHUNK"] == 32768


@pytest.mark.parametrize("batch,num_classes,dtype", [(2, 50257, torch.float32), (1, 8193, torch.bfloat16),
                                                     (1, 8192, torch.float16)])
def test_default_plan_at_large_c(few_sms, batch, num_classes, dtype):
    """C = 50257 and 8193 split rows (C not a multiple of the block), 8192 is one tile."""
    g = torch.Generator().manual_seed(num_classes)
    s = make_logits(batch, num_classes, dtype, generator=g)
    t = make_logits(batch, num_classes, dtype, generator=g)
    _, launches = kd.plan(s, t, None, None, None, 1.0, 1.0, IGNORE, True, True)
    expected = kd._kd_tile_kernel if num_classes <= kd.TILE_MAX_COLUMNS else kd._kd_split_kernel
    assert launches[0].kernel is expected
    run_case(s, t, "class" if batch > 1 else "row", generator=g)


DTYPE_PAIRS = [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
               (torch.float32, torch.float16), (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS)
def test_half_and_mixed_dtypes(student_dtype, teacher_dtype, form):
    g = torch.Generator().manual_seed(3)
    run_case(make_logits(7, 33, student_dtype, generator=g), make_logits(7, 33, teacher_dtype, generator=g),
             "class", form=form, config=small_config(form, 33), generator=g)


@pytest.mark.parametrize("layout", ["transposed", "column-slice", "row-slice", "offset"])
@pytest.mark.parametrize("form", FORMS)
def test_non_contiguous_inputs(layout, form):
    g = torch.Generator().manual_seed(5)
    s = make_logits(7, 40, torch.float32, layout, generator=g)
    t = make_logits(7, 40, torch.bfloat16, "transposed" if layout != "transposed" else "row-slice", generator=g)
    assert not t.is_contiguous() and (layout == "offset" or not s.is_contiguous())
    run_case(s, t, "class-both", form=form, config=small_config(form, 40), generator=g)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("low,high", [(0.05, 0.05), (50.0, 50.0), (0.05, 50.0)])
def test_extreme_temperatures(low, high, form):
    g = torch.Generator().manual_seed(11)
    run_case(make_logits(7, 50, torch.float32, scale=8.0, generator=g),
             make_logits(7, 50, torch.float32, scale=8.0, generator=g), "class-both", form=form,
             config=small_config(form, 50), generator=g, low=low, high=high)


@pytest.mark.parametrize("form", FORMS)
def test_infinite_and_huge_logits(form):
    """-inf teacher logits (0 log 0 = 0, also where the student is -inf) and +/-1e4 logits."""
    g = torch.Generator().manual_seed(13)
    s = make_logits(12, 45, torch.float32, generator=g)
    t = make_logits(12, 45, torch.float32, generator=g)
    t[0, :44] = float("-inf")                 # one class left
    t[1, ::2] = float("-inf")
    s[1, ::4] = float("-inf")                 # student -inf only where the teacher is -inf
    t[2, 5], s[2, 7] = 1e4, -1e4
    t[3], s[3] = 1e4 * torch.sign(t[3]), 1e4 * torch.sign(s[3])
    t[4, 30:] = float("-inf")                 # the last blocks and chunks hold only -inf
    t[5, :36] = float("-inf")                 # and the first ones
    s[5, :3] = float("-inf")
    run_case(s, t, "class", form=form, config=small_config(form, 45), generator=g)


def _reference_with_grads(s, t):
    """The fp32 reference (the kernels' precision: exp(-200) is 0) and its autograd gradients."""
    s = s.detach().cpu().float().requires_grad_()
    t = t.detach().cpu().float().requires_grad_()
    rows = reference.kd_kl_div(s, t, reduction="none")
    return (rows.detach(), *torch.autograd.grad(rows.sum(), (s, t)))


@pytest.mark.parametrize("form", FORMS)
def test_student_minus_inf_under_teacher_mass_gives_inf(form):
    s = torch.zeros(3, 40, device=DEVICE)
    t = torch.zeros(3, 40, device=DEVICE)
    s[0, 3] = float("-inf")
    s[1, 35], t[1, 35] = float("-inf"), -200.0   # teacher probability underflows to 0: finite KL
    s[2, 20:] = float("-inf")                    # in the second chunk only
    rows, grad_s, grad_t = kd.launch(s, t, None, None, None, 1.0, 1.0, IGNORE, True, True, form=form,
                                     config=small_config(form, 40))
    ref_rows, ref_s, ref_t = _reference_with_grads(s, t)
    assert math.isinf(rows[0]) and rows[0] > 0 and math.isinf(rows[2]) and rows[2] > 0
    torch.testing.assert_close(rows.cpu(), ref_rows)
    torch.testing.assert_close(grad_s.cpu(), ref_s, rtol=1e-5, atol=1e-6)
    # the teacher's gradient is -inf under its mass and NaN where the student is -inf: as the reference
    torch.testing.assert_close(grad_t.cpu()[[0, 2]], ref_t[[0, 2]], equal_nan=True)


@pytest.mark.parametrize("form", FORMS)
def test_rows_all_minus_inf_are_nan_as_the_reference(form):
    """A kept row whose student (or teacher, or both) logits are all -inf: NaN loss and gradients."""
    s = torch.randn(5, 40, generator=torch.Generator().manual_seed(31)).to(DEVICE)
    t = torch.randn(5, 40, generator=torch.Generator().manual_seed(37)).to(DEVICE)
    s[0] = float("-inf")
    t[1] = float("-inf")
    s[2], t[2] = float("-inf"), float("-inf")
    labels = torch.tensor([0, 1, 2, 3, IGNORE], device=DEVICE)
    s[4] = float("-inf")                         # ignored: 0, not NaN
    rows, grad_s, grad_t = kd.launch(s, t, labels, None, None, 1.0, 1.0, IGNORE, True, True, form=form,
                                     config=small_config(form, 40))
    expected = reference.kd_kl_div(s.cpu().double(), t.cpu().double(), labels.cpu(), reduction="none")
    torch.testing.assert_close(rows.cpu().double(), expected, equal_nan=True)
    assert rows[:3].isnan().all() and rows[3].isfinite() and rows[4] == 0
    assert grad_s[:3].isnan().all() and grad_t[:3].isnan().all()
    assert grad_s[3:].isfinite().all() and (grad_s[4] == 0).all() and (grad_t[4] == 0).all()
    _, ref_s, ref_t = _reference_with_grads(s[:1], t[:1])   # the reference's gradients of row 0: NaN too
    assert ref_s.isnan().all() and ref_t.isnan().all()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("student_grad,teacher_grad", [(True, False), (False, True), (False, False)])
def test_gradient_flags(student_grad, teacher_grad, form):
    g = torch.Generator().manual_seed(17)
    s = make_logits(5, 40, torch.bfloat16, generator=g)
    t = make_logits(5, 40, torch.float16, generator=g)
    labels, tau_t, tau_s, scalar_t, scalar_s = temperatures("class", 5, 40, generator=g)
    config = small_config(form, 40)
    full = kd.launch(s, t, labels, tau_t, tau_s, scalar_t, scalar_s, IGNORE, True, True, form=form, config=config)
    rows, grad_s, grad_t = kd.launch(s, t, labels, tau_t, tau_s, scalar_t, scalar_s, IGNORE, student_grad,
                                     teacher_grad, form=form, config=config)
    assert torch.equal(rows, full[0])
    for asked, grad, reference_grad in ((student_grad, grad_s, full[1]), (teacher_grad, grad_t, full[2])):
        if asked:
            assert torch.equal(grad, reference_grad)
        else:
            assert grad.shape == (0,) and grad.dtype == reference_grad.dtype


def test_contract_entry_point_and_empty_batch():
    g = torch.Generator().manual_seed(19)
    s, t = make_logits(4, 6, torch.float32, generator=g), make_logits(4, 6, torch.float32, generator=g)
    ours = kd.kd_kl_div_forward(s, t, None, None, None, 1.0, 1.0, IGNORE, True, False)
    torch.testing.assert_close(ours[0].cpu(), reference.kd_kl_div(s.cpu(), t.cpu(), reduction="none"))
    rows, grad_s, grad_t = kd.kd_kl_div_forward(s[:0], t[:0], None, None, None, 1.0, 1.0, IGNORE, True, False)
    assert rows.shape == (0,) and grad_s.shape == (0, 6) and grad_t.shape == (0,)


def test_kernels_do_not_import_the_reference():
    """The reference is the tests' oracle: the kernel module has its own eager value check."""
    assert not hasattr(kd, "reference")


def _bad_call(**changes):
    s = torch.zeros(4, 5, device=DEVICE)
    args = dict(student_logits=s, teacher_logits=s.clone(), labels=torch.tensor([0, 1, IGNORE, 4], device=DEVICE),
                teacher_temperature=torch.ones(5, device=DEVICE), student_temperature=None,
                teacher_temperature_scalar=1.0, student_temperature_scalar=1.0, ignore_index=IGNORE,
                student_grad=True, teacher_grad=False)
    args.update(changes)
    return kd.kd_kl_div_forward(**args)


@pytest.mark.parametrize("changes,message", [
    ({"student_logits": torch.zeros(4, 6)}, "shape"),
    ({"student_logits": torch.zeros(4, 5, dtype=torch.float64)}, "float64"),
    ({"labels": torch.zeros(3, dtype=torch.int64)}, "labels"),
    ({"labels": torch.zeros(4, dtype=torch.int32)}, "labels"),
    ({"teacher_temperature": torch.ones(4)}, "teacher_temperature"),
    ({"labels": None, "teacher_temperature": None, "student_temperature": torch.ones(5)}, "student_temperature"),
])
def test_bad_metadata_is_a_value_error(changes, message):
    changes = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in changes.items()}
    with pytest.raises(ValueError, match=message):
        _bad_call(**changes)


def test_unknown_form_is_a_value_error():
    s = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="form"):
        kd.launch(s, s, None, None, None, 1.0, 1.0, IGNORE, True, False, form="online")


@pytest.mark.skipif(HAS_GPU, reason="on a GPU a bad value gives a NaN row, not an error (device asserts are opt-in); tests/cuda checks the NaN rows")
@pytest.mark.parametrize("changes,message", [
    ({"labels": torch.tensor([0, 5, IGNORE, 4])}, "labels"),
    ({"labels": torch.tensor([0, -1, 2, 4])}, "labels"),
    ({"teacher_temperature": torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0])}, "teacher_temperature"),
    ({"teacher_temperature": torch.tensor([1.0, 1.0, 1.0, 1.0, float("inf")])}, "teacher_temperature"),
    ({"labels": None, "teacher_temperature": None, "student_temperature": torch.tensor([1.0, 1.0, float("nan"), 1.0])},
     "student_temperature"),
])
def test_bad_values_are_checked_on_cpu(changes, message):
    """As the C++ kernel's TORCH_CHECK (and a device assert on a GPU): a RuntimeError."""
    with pytest.raises(RuntimeError, match=message):
        _bad_call(**changes)


@pytest.mark.parametrize("scalar", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scalar_temperature(scalar):
    with pytest.raises(RuntimeError, match="student_temperature_scalar"):
        _bad_call(student_temperature_scalar=scalar)


@pytest.mark.skipif(HAS_GPU, reason="CPU-only path")
def test_unused_bad_temperature_is_not_an_error():
    """Only temperatures that rows use are checked (class 2 is unused, class 3's row is ignored)."""
    rows, _, _ = _bad_call(labels=torch.tensor([0, 1, IGNORE, 4]),
                           teacher_temperature=torch.tensor([1.0, 1.0, -1.0, 1.0, 1.0]))
    assert torch.isfinite(rows).all()


@pytest.mark.parametrize("form", FORMS)
def test_bad_rows_degrade_to_nan_without_asserts(form):
    """Without device asserts (interpreter, or a build without debug) a bad row reads NaN, not garbage."""
    s = torch.zeros(3, 40, device=DEVICE)
    labels = torch.tensor([0, 1, 1], device=DEVICE)
    tau = torch.ones(40, device=DEVICE)
    (row_loss, grad, _), launches = kd.plan(s, s, labels, tau, None, 1.0, 1.0, IGNORE, True, False, form,
                                            small_config(form, 40))
    # after the eager checks: row 1's label out of range, row 2's class temperature negative
    labels[1] = 70
    tau[1] = -2.0
    for step in launches:
        dataclasses.replace(step, debug=False).run()
    assert row_loss[0] == 0 and row_loss[1:].isnan().all() and grad[1:].isnan().all() and (grad[0] == 0).all()


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 6), num_classes=st.integers(1, 70), kind=st.sampled_from(["scalar", "class", "row"]),
       log_low=st.floats(math.log(0.05), math.log(50.0)), log_span=st.floats(0.0, 3.0),
       scale=st.sampled_from([0.01, 1.0, 30.0, 1000.0]), form=st.sampled_from(FORMS), seed=st.integers(0, 2**16),
       programs=st.integers(1, 40), extra_lag=st.integers(0, 50))
def test_property_random_shapes_and_temperatures(batch, num_classes, kind, log_low, log_span, scale, form, seed,
                                                 programs, extra_lag):
    """Random shapes, temperatures and logit scales; the split form with any grid and any lag."""
    g = torch.Generator().manual_seed(seed)
    low = math.exp(log_low)
    high = min(50.0, low * math.exp(log_span))
    config = small_config(form, num_classes)
    if form == "split":
        config = dict(config, PROGRAMS=programs, LAG=-(-num_classes // config["CHUNK"]) + extra_lag)
    run_case(make_logits(batch, num_classes, torch.float32, scale=scale, generator=g),
             make_logits(batch, num_classes, torch.float32, scale=scale, generator=g), kind, form=form,
             config=config, generator=g, low=low, high=high)


# Row weights: w_i = sample_weight_scalar * weight[label_i] * sample_weight[i], scaling the loss and both gradients.

WEIGHTINGS = ["class", "sample", "number", "all"]


def make_weights(weighting, batch, num_classes, labels, generator):
    """(weight, sample_weight, sample_weight_scalar) for the launcher, each a factor of up to 2.

    A kept row (row 1) gets weight 0 from each tensor given. "all" passes a fp64 class weight and a
    strided fp16 sample weight: the launcher takes them in any float dtype and layout.
    """
    weight, sample, scalar = None, None, 1.0
    if weighting in ("class", "all"):
        weight = 2 * torch.rand(num_classes, generator=generator, dtype=torch.float64)
        weight[labels[1]] = 0.0
        weight = weight.to(DEVICE, torch.float64 if weighting == "all" else torch.float32)
    if weighting in ("sample", "all"):
        sample = 2 * torch.rand(2 * batch, generator=generator)
        sample[2] = 0.0
        sample = sample.to(DEVICE, torch.float16 if weighting == "all" else torch.float32)[::2]
    if weighting in ("number", "all"):
        scalar = 1.7
    return weight, sample, scalar


def run_weighted_case(s, t, weighting, form, config, generator):
    """The weighted launcher against the weighted reference (values and gradients of the rows' sum)."""
    batch, num_classes = s.shape
    labels, tau_t, _, scalar_t, scalar_s = temperatures("class", batch, num_classes, generator=generator)
    labels[::3] = IGNORE
    weight, sample, scalar = make_weights(weighting, batch, num_classes, labels, generator)
    outputs = kd.launch(s, t, labels, tau_t, None, scalar_t, scalar_s, IGNORE, True, True, form=form, config=config,
                        weight=weight, sample_weight=sample, sample_weight_scalar=scalar)
    rows_weight = scalar if sample is None else sample.cpu().double() * scalar
    ref_s, ref_t = s.detach().cpu().float().requires_grad_(), t.detach().cpu().float().requires_grad_()
    ref_rows = reference.kd_kl_div(ref_s, ref_t, labels.cpu(), tau_t.cpu(), scalar_s, "none", IGNORE,
                                   None if weight is None else weight.cpu(), rows_weight)
    expected = (ref_rows.detach(), *torch.autograd.grad(ref_rows.sum(), (ref_s, ref_t)))
    outputs = [x.cpu() for x in outputs]
    largest = 2.0 ** sum(x is not None for x in (weight, sample)) * scalar
    assert_matches(outputs, expected, s.cpu(), t.cpu(), tau_t, None, scalar_t, scalar_s, weight_scale=largest)
    row_weight = torch.full((batch,), scalar)
    if weight is not None:
        row_weight *= weight.cpu()[labels.cpu().clamp(min=0)].float()
    if sample is not None:
        row_weight *= sample.cpu().float()
    zero = (labels.cpu() == IGNORE) | (row_weight == 0)
    assert zero[1] == (weight is not None or sample is not None)
    for out in outputs:
        assert (out[zero] == 0).all(), "ignored rows and rows of weight 0 give 0"
    assert (outputs[0][~zero] > 0).all()
    return outputs


# Every weighting in fp32, the half dtypes with each weight tensor (the interpreter is slow: not the full product).
WEIGHTED_CASES = [(weighting, torch.float32) for weighting in WEIGHTINGS] + [
    ("all", torch.float16), ("all", torch.bfloat16), ("class", torch.bfloat16), ("sample", torch.float16)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("weighting,dtype", WEIGHTED_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_weighted_rows_match_reference(weighting, dtype, form):
    """Per-class, per-row, number and all weights together, in both forms (tile: three programs of
    4 rows; split: two chunks a row)."""
    g = torch.Generator().manual_seed(41)
    batch = 9 if form == "tile" else 5
    s, t = make_logits(batch, 37, dtype, generator=g), make_logits(batch, 37, dtype, generator=g)
    run_weighted_case(s, t, weighting, form, small_config(form, 37), g)


@pytest.mark.parametrize("form", FORMS)
def test_weights_scale_the_unweighted_outputs(form):
    """Weighted outputs are the unweighted ones times w_i (to rounding); a number weight of 0 zeroes all."""
    g = torch.Generator().manual_seed(43)
    s, t = make_logits(5, 40, torch.float32, generator=g), make_logits(5, 40, torch.float32, generator=g)
    labels = torch.tensor([0, 3, IGNORE, 39, 7], device=DEVICE)
    weight = torch.linspace(0.0, 2.0, 40, device=DEVICE)  # class 0: weight 0
    sample = torch.tensor([0.5, 1.5, 2.0, 0.0, 3.0], device=DEVICE)
    config = small_config(form, 40)
    plain = kd.launch(s, t, labels, None, None, 1.0, 1.0, IGNORE, True, True, form=form, config=config)
    weighted = kd.launch(s, t, labels, None, None, 1.0, 1.0, IGNORE, True, True, form=form, config=config,
                         weight=weight, sample_weight=sample, sample_weight_scalar=0.25)
    w = 0.25 * weight[labels.clamp(min=0)] * sample
    for ours, unweighted in zip(weighted, plain):
        torch.testing.assert_close(ours, unweighted * (w if unweighted.dim() == 1 else w[:, None]), rtol=1e-6,
                                   atol=1e-7)
    zero = kd.launch(s, t, labels, None, None, 1.0, 1.0, IGNORE, True, True, form=form, config=config,
                     sample_weight_scalar=0.0)
    assert all((out == 0).all() for out in zero)


@pytest.mark.parametrize("form", FORMS)
def test_zero_weight_on_an_infinite_row_is_nan_as_the_reference(form):
    """0 * inf: a row whose KL is +inf (student -inf under teacher mass) gives NaN at weight 0, as the fallback."""
    s = torch.zeros(2, 40, device=DEVICE)
    t = torch.zeros(2, 40, device=DEVICE)
    s[:, 3] = float("-inf")
    sample = torch.tensor([0.0, 2.0], device=DEVICE)
    rows, _, _ = kd.launch(s, t, None, None, None, 1.0, 1.0, IGNORE, True, False, form=form,
                           config=small_config(form, 40), sample_weight=sample)
    expected = reference.kd_kl_div(s.cpu(), t.cpu(), reduction="none", sample_weight=sample.cpu())
    assert rows[0].isnan() and expected[0].isnan() and rows[1] == expected[1] == float("inf")


def _bad_weighted_call(**changes):
    return _bad_call(**dict({"weight": torch.ones(5, device=DEVICE), "sample_weight": torch.ones(4, device=DEVICE),
                             "sample_weight_scalar": 1.0}, **changes))


@pytest.mark.parametrize("changes,message", [
    ({"weight": torch.ones(4)}, "weight must have shape"),
    ({"sample_weight": torch.ones(5)}, "sample_weight must have shape"),
    ({"sample_weight": torch.ones(4, 1)}, "sample_weight must have shape"),
    ({"labels": None, "teacher_temperature": None}, "needs labels"),
    ({"sample_weight_scalar": -0.5}, "sample_weight_scalar must be non-negative and finite"),
    ({"sample_weight_scalar": float("nan")}, "sample_weight_scalar must be non-negative and finite"),
    ({"sample_weight_scalar": float("inf")}, "sample_weight_scalar must be non-negative and finite"),
])
def test_bad_weight_arguments_are_value_errors(changes, message):
    changes = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in changes.items()}
    with pytest.raises(ValueError, match=message):
        _bad_weighted_call(**changes)


@pytest.mark.skipif(HAS_GPU, reason="weight values are read on the host only for CPU tensors")
@pytest.mark.parametrize("name,index,value", [("weight", 1, -1.0), ("weight", 3, -1.0), ("weight", 0, float("nan")),
                                              ("weight", 4, float("inf")), ("sample_weight", 2, -0.5),
                                              ("sample_weight", 1, float("nan"))])
def test_bad_weight_values_are_value_errors(name, index, value):
    """As the C++ kernel: every value, used by a kept row or not (class 3 is unused, row 2 is ignored)."""
    bad = torch.ones(5 if name == "weight" else 4, device=DEVICE)
    bad[index] = value
    with pytest.raises(ValueError, match=f"{name} must be non-negative and finite"):
        _bad_weighted_call(**{name: bad})


# The launch plan, on meta tensors (nothing runs).

def _plan(batch, num_classes, dtype=torch.float32, student_grad=True, sms=kd.DEFAULT_SMS):
    logits = torch.empty(batch, num_classes, dtype=dtype, device="meta")
    return kd.plan(logits, logits, None, None, None, 1.0, 1.0, IGNORE, student_grad, False)[1]


def _programs(launches):
    return min(launch.grid[0] for launch in launches)


@settings(max_examples=200, deadline=None)
@given(batch=st.integers(1, 1 << 17), log_c=st.floats(0.0, math.log(1 << 18)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), student_grad=st.booleans())
def test_plan_fills_the_gpu(batch, log_c, dtype, student_grad):
    """>= 2 programs per SM from 1 MiB of logits, >= 1 from 256 KiB, one per row (up to the SMs) below."""
    num_classes = max(1, int(math.exp(log_c)))
    launches = _plan(batch, num_classes, dtype, student_grad)
    nbytes = batch * num_classes * dtype.itemsize
    stats_programs = launches[0].grid[0]
    if nbytes >= kd.TWO_WAVE_BYTES:
        assert stats_programs >= 2 * kd.DEFAULT_SMS
    elif nbytes >= kd.ONE_WAVE_BYTES:
        assert stats_programs >= kd.DEFAULT_SMS
    else:
        assert stats_programs >= min(batch, kd.DEFAULT_SMS)
    assert len(launches) == 1  # the row kernel: the reduction is not asked for
    if launches[0].kernel is kd._kd_split_kernel:
        args = dict(zip(launches[0].kernel.arg_names, launches[0].args))
        chunk = args["blocks_per_chunk"] * launches[0].constexprs["BLOCK_N"]
        logits = torch.empty(0, dtype=dtype, device="meta")
        working = kd.split_working_set(args["lag"], stats_programs, chunk,
                                       kd.split_column_bytes((logits, logits), student_grad, False))
        assert args["lag"] >= (args["n_chunks"] if student_grad else batch * args["n_chunks"])
        assert working <= kd.SPLIT_L2_BUDGET or chunk == kd.SPLIT_MIN_CHUNK
    for launch in launches:
        assert launch.num_warps <= kd.MAX_WARPS
        blocks = launch.constexprs.get("BLOCK_M", 1) * launch.constexprs["BLOCK_N"]
        assert blocks <= 32 * launch.num_warps * kd.ELEMENTS_PER_THREAD


@pytest.mark.parametrize("shape,form,programs", [((128, 10), "tile", 128), ((1024, 100), "tile", 256),
                                                 ((256, 1000), "tile", 256), ((8, 32000), "split", 256),
                                                 ((64, 262144), "split", 264), ((4096, 32000), "split", 264),
                                                 ((8, 8192), "split", 256), ((4096, 8192), "tile", 4096)])
def test_plan_at_the_benchmark_shapes(shape, form, programs):
    launches = _plan(*shape)
    assert (launches[0].kernel is kd._kd_tile_kernel) == (form == "tile")
    assert _programs(launches) == programs


@pytest.mark.parametrize("shape,layout,dtype,vec", [((4, 10), "contiguous", torch.float32, 2),
                                                    ((4, 100), "contiguous", torch.float32, 4),
                                                    ((4, 1000), "contiguous", torch.bfloat16, 8),
                                                    ((4, 1000), "contiguous", torch.float32, 4),
                                                    ((4, 37), "contiguous", torch.float32, 1),
                                                    ((1, 37), "contiguous", torch.float32, 1),
                                                    ((1, 36), "contiguous", torch.float32, 4),
                                                    ((4, 40), "column-slice", torch.float32, 1),
                                                    ((4, 40), "transposed", torch.float32, 1),
                                                    ((4, 20), "row-slice", torch.float32, 4)])
def test_vector_width(shape, layout, dtype, vec):
    s = make_logits(*shape, dtype, layout)
    assert kd.vector_width(shape[1], shape[0], (s, s)) == vec
