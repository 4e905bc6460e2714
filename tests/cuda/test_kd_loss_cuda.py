"""The fused KD loss on CUDA tensors (the Triton kernels) against the reference, at the benchmark shapes and dtypes.

On a GPU the Triton interpreter is off: these run the compiled kernels, as a user's training does.
"""

import pytest
import torch

from fastabsld import reference
from fastabsld.loss import kd_kl_div

pytestmark = pytest.mark.cuda

SHAPES = [(128, 10), (1024, 100), (256, 1000), (8, 32000), (4096, 32000), (64, 262144), (3, 8193), (37, 4097)]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]
IGNORE = -100


def _tolerances(num_classes, scale, out_dtype=torch.float32):
    """(rtol, atol) of fp32 math over C columns on logits of magnitude ``scale``, stored in ``out_dtype``.

    The inputs are exact in every dtype (the reference reads the same values); fp32 reductions over C
    terms err like a random walk, ~sqrt(C) roundings of 2**-24; a stored gradient adds its dtype's rounding.
    """
    fp32 = 16 * 2.0 ** -24 * num_classes ** 0.5
    stored = torch.finfo(out_dtype).eps if out_dtype != torch.float32 else 0.0
    return fp32 + stored, fp32 * (1 + scale)


def _case(batch, num_classes, dtypes, kind, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    s = (3 * torch.randn(batch, num_classes, device="cuda", generator=gen)).to(dtypes[0])
    t = (3 * torch.randn(batch, num_classes, device="cuda", generator=gen)).to(dtypes[1])
    labels = torch.randint(0, num_classes, (batch,), device="cuda", generator=gen)
    labels[::5] = IGNORE
    kwargs = {"labels": labels, "ignore_index": IGNORE}
    if kind in ("class", "weighted"):
        kwargs["teacher_temperature"] = 0.5 + 4 * torch.rand(num_classes, device="cuda", generator=gen)
        if kind == "weighted":  # row weights up to 2 * 1.5, a class of weight 0
            kwargs["weight"] = 2 * torch.rand(num_classes, device="cuda", generator=gen)
            kwargs["weight"][0] = 0.0
            kwargs["sample_weight"] = 0.5 + torch.rand(batch, device="cuda", generator=gen)
    else:
        kwargs["teacher_temperature"], kwargs["student_temperature"] = 2.0, 0.7
    return s, t, kwargs


@pytest.mark.parametrize("kind", ["class", "scalar", "weighted"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("batch,num_classes", SHAPES, ids=lambda v: str(v))
def test_values_and_gradients_match_the_reference(batch, num_classes, dtypes, kind):
    s, t, kwargs = _case(batch, num_classes, dtypes, kind, seed=batch + num_classes)
    s.requires_grad_(True)
    t.requires_grad_(True)
    rows = kd_kl_div(s, t, reduction="none", **kwargs)
    grad_out = torch.rand_like(rows)
    gs, gt = torch.autograd.grad(rows, (s, t), grad_out)
    s64, t64 = s.detach().double().requires_grad_(True), t.detach().double().requires_grad_(True)
    tau = kwargs["teacher_temperature"]
    ref = reference.kd_kl_div(s64, t64, kwargs["labels"], tau.double() if torch.is_tensor(tau) else tau,
                              kwargs.get("student_temperature", 1.0), "none", IGNORE, kwargs.get("weight"),
                              kwargs.get("sample_weight"))
    rs, rt = torch.autograd.grad(ref, (s64, t64), grad_out.double())
    scale = 3.0 * 4 / 0.5  # ~4 sigma of 3 * N(0, 1) logits over the smallest temperature
    rtol, atol = _tolerances(num_classes, scale)
    largest_weight = 3.0 if kind == "weighted" else 1.0
    torch.testing.assert_close(rows.double(), ref, rtol=rtol, atol=atol * largest_weight)
    for grad, want, dtype in ((gs, rs, dtypes[0]), (gt, rt, dtypes[1])):
        rtol, atol = _tolerances(num_classes, scale, dtype)
        torch.testing.assert_close(grad.double(), want, rtol=rtol, atol=atol * float(want.abs().max()))
    assert gs.dtype == s.dtype and gt.dtype == t.dtype


@pytest.mark.parametrize("batch,num_classes", [(8, 32000), (64, 262144)])
def test_results_are_bit_identical_run_to_run(batch, num_classes):
    s, t, kwargs = _case(batch, num_classes, (torch.float32, torch.float32), "class", seed=1)
    s.requires_grad_(True)
    first = kd_kl_div(s, t, reduction="none", **kwargs)
    (g1,) = torch.autograd.grad(first.sum(), s)
    for _ in range(3):
        again = kd_kl_div(s, t, reduction="none", **kwargs)
        (g2,) = torch.autograd.grad(again.sum(), s)
        assert torch.equal(first, again) and torch.equal(g1, g2)


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_compiled_fullgraph_matches_eager(reduction):
    s, t, kwargs = _case(256, 1000, (torch.bfloat16, torch.float32), "class", seed=3)
    s.requires_grad_(True)

    def loss(a, b, labels, tau):
        return kd_kl_div(a, b, labels=labels, teacher_temperature=tau, reduction=reduction, ignore_index=IGNORE)

    compiled = torch.compile(loss, fullgraph=True)
    want = loss(s, t, kwargs["labels"], kwargs["teacher_temperature"])
    (want_grad,) = torch.autograd.grad(want, s)
    got = compiled(s, t, kwargs["labels"], kwargs["teacher_temperature"])
    (got_grad,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-2, atol=1e-6)


def test_second_backward_with_retain_graph():
    s, t, kwargs = _case(128, 10, (torch.float32, torch.float32), "class", seed=4)
    s.requires_grad_(True)
    loss = kd_kl_div(s, t, reduction="batchmean", **kwargs)
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 3, s)
    torch.testing.assert_close(g2, 3 * g1)


def _kernels_of(fn):
    """Names of the CUDA kernels and memory copies ``fn`` runs (torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("batch,num_classes", [(128, 10), (128, 100), (8, 32000)])
def test_eager_call_is_two_launches_forward_and_one_backward(batch, num_classes):
    """Tile form: the row kernel and the reduction; split form: the zeroing of its work counters
    and the persistent kernel (which reduces the rows itself). One scaling kernel backward."""
    s, t, kwargs = _case(batch, num_classes, (torch.float32, torch.float32), "class", seed=5)
    s.requires_grad_(True)
    kd_kl_div(s, t, reduction="mean", **kwargs)  # compile
    losses = []
    forward = _kernels_of(lambda: losses.append(kd_kl_div(s, t, reduction="mean", **kwargs)))
    backward = _kernels_of(lambda: torch.autograd.grad(losses[0], s, torch.ones((), device="cuda")))
    if num_classes <= 8192:
        assert len(forward) == 2 and "_kd_tile_kernel" in forward[0] and "_kd_reduce_kernel" in forward[1], forward
    else:
        assert len(forward) == 2 and "_kd_" not in forward[0] and "_kd_split_kernel" in forward[1], forward
    assert len(backward) == 1 and "_kd_scale_kernel" in backward[0], backward


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)], ids=str)
@pytest.mark.parametrize("chunk,programs,lag", [(256, None, None), (512, 1000, "chunks"), (1024, 7, "chunks"),
                                                (2048, None, 1_000_000)])
def test_split_kernel_schedules_agree_bit_for_bit(dtypes, chunk, programs, lag):
    """The persistent split kernel with real concurrency: grids of 7 to 1000 programs, the
    smallest lag (gradient items right after their rows' statistics: they wait) and the largest
    (every statistics item first). Every schedule gives the reference's values and the same bits."""
    from fastabsld.kernels import kd_kl_div as kd

    s, t, kwargs = _case(64, 50257, dtypes, "class", seed=10)
    args = (s, t, kwargs["labels"], kwargs["teacher_temperature"], None, 1.0, 1.0, IGNORE, True, True)
    block = min(chunk, 1024)
    config = {"BLOCK_N": block, "CHUNK": chunk, "num_warps": max(1, block // 256), "num_stages": 3}
    plain = kd.launch(*args, form="split", config=config)  # the plan's grid and lag for this chunk
    config.update(PROGRAMS=programs, LAG=-(-50257 // chunk) if lag == "chunks" else lag)
    first = kd.launch(*args, form="split", config=config)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, kd.launch(*args, form="split", config=config)))
    assert all(torch.equal(a, b) for a, b in zip(first, plain))
    s64, t64 = s.double().requires_grad_(True), t.double().requires_grad_(True)
    ref = reference.kd_kl_div(s64, t64, kwargs["labels"], kwargs["teacher_temperature"].double(), 1.0, "none",
                              IGNORE)
    rs, rt = torch.autograd.grad(ref.sum(), (s64, t64))
    rtol, atol = _tolerances(50257, 3.0 * 4 / 0.5)
    torch.testing.assert_close(first[0].double(), ref, rtol=rtol, atol=atol)
    for grad, want, dtype in ((first[1], rs, dtypes[0]), (first[2], rt, dtypes[1])):
        rtol, atol = _tolerances(50257, 3.0 * 4 / 0.5, dtype)
        torch.testing.assert_close(grad.double(), want, rtol=rtol, atol=atol * float(want.abs().max()))


def _assert_graph_replays_match_eager(step, replays):
    """Captures ``step`` (returning loss and gradient) in a CUDA graph after warm-up calls on a side
    stream, and checks that each replay gives the eager call's exact bits."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            want_loss, want_grad = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got_loss, got_grad = step()
    for _ in range(replays):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got_loss, want_loss) and torch.equal(got_grad, want_grad)


def test_split_form_is_captured_by_a_cuda_graph():
    """The split kernel's counters are zeroed by a launch of the call itself: every replay starts
    from zeros (nothing of a previous call survives on the device)."""
    s, t, kwargs = _case(8, 32000, (torch.float32, torch.float32), "class", seed=11)
    s.requires_grad_(True)

    def step():
        loss = kd_kl_div(s, t, reduction="mean", **kwargs)
        return loss, torch.autograd.grad(loss, s)[0]

    _assert_graph_replays_match_eager(step, replays=3)


def test_eager_call_with_cpu_scalars_is_captured_by_a_cuda_graph():
    """0-d CPU temperature and sample weight are numbers: no copy to the device, so capture works."""
    s, t, kwargs = _case(128, 100, (torch.float32, torch.float32), "class", seed=6)
    kwargs["student_temperature"] = torch.tensor(0.7)
    kwargs["sample_weight"] = torch.tensor(0.5)
    s.requires_grad_(True)

    def step():
        loss = kd_kl_div(s, t, reduction="mean", **kwargs)
        return loss, torch.autograd.grad(loss, s)[0]

    _assert_graph_replays_match_eager(step, replays=1)


def test_bad_rows_are_nan_without_device_asserts():
    s, t, kwargs = _case(16, 10, (torch.float32, torch.float32), "class", seed=7)
    kwargs["labels"][3] = 10  # out of range
    kwargs["teacher_temperature"][kwargs["labels"][5]] = -1.0
    rows = kd_kl_div(s, t, reduction="none", **kwargs)
    torch.cuda.synchronize()
    assert rows[3].isnan() and rows[5].isnan()
    kept = torch.ones(16, dtype=torch.bool, device="cuda")
    kept[[3, 5]] = False
    assert torch.isfinite(rows[kept]).all()


def test_fp16_student_gradient_at_32000_columns():
    """Kept in fp32 until grad_output (a loss scaler's 2**16) has scaled it: within fp16 rounding of fp64."""
    gen = torch.Generator(device="cuda").manual_seed(8)
    s = (2 * torch.randn(8, 32000, device="cuda", generator=gen)).half().requires_grad_(True)
    t = (2 * torch.randn(8, 32000, device="cuda", generator=gen)).half()
    (grad,) = torch.autograd.grad(kd_kl_div(s, t, reduction="sum"), s, torch.tensor(2.0 ** 16, device="cuda"))
    s64 = s.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad(reference.kd_kl_div(s64, t.double(), reduction="sum") * 2.0 ** 16, s64)
    relative = ((grad.double() - ref).abs() / ref.abs().clamp_min(1e-300)).flatten()
    assert torch.quantile(relative, 0.9).item() <= 2.0 ** -11


def test_reduce_overhead_compile_captures_the_triton_kernels():
    """mode="reduce-overhead": Inductor launches the Triton kernels from its code inside a CUDA graph."""
    s, t, kwargs = _case(128, 100, (torch.float32, torch.float32), "class", seed=9)
    s.requires_grad_(True)

    def loss(a, b, labels, tau):
        return kd_kl_div(a, b, labels=labels, teacher_temperature=tau, reduction="mean", ignore_index=IGNORE)

    compiled = torch.compile(loss, mode="reduce-overhead", fullgraph=True)
    want = loss(s, t, kwargs["labels"], kwargs["teacher_temperature"])
    (want_grad,) = torch.autograd.grad(want, s)
    for _ in range(3):  # warm-up runs, then replays of the captured graph
        got = compiled(s, t, kwargs["labels"], kwargs["teacher_temperature"])
        (got_grad,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-9)
