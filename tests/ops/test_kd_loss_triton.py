"""The eager CUDA path of the KD loss (``fastabsld.ops.kd_loss_triton``) against the reference.

Without a GPU the Triton kernels run in the interpreter on CPU tensors, routed down the CUDA
path by adding "cpu" to ``EAGER_DEVICES``; on a GPU the same tests run on CUDA tensors, compiled. Checked: values and gradients of every reduction, dtype and temperature
kind against ``fastabsld.reference`` in fp64; the launches (at most two forward for the tile
form, one backward, no other device work); the plan cache; numbers kept on the host; fp16
gradients that survive C = 20000 columns; device asserts off unless asked for.
"""

import pytest
import torch

from fastabsld import reference
from fastabsld.loss import kd_kl_div
from fastabsld.ops import kd_loss, kd_loss_triton
from tests.conftest import HAS_GPU, INTERPRETED

pytestmark = pytest.mark.skipif(kd_loss_triton.kernels() is None or not (HAS_GPU or INTERPRETED),
                                reason="needs triton, and a GPU or the interpreter")
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
IGNORE = -100
REDUCTIONS = ("none", "sum", "batchmean", "mean")


@pytest.fixture
def cuda_path(monkeypatch):
    """CPU tensors take the eager CUDA path; yields the list of launched kernels' names."""
    kd = kd_loss_triton.kernels()
    monkeypatch.setattr(kd_loss_triton, "EAGER_DEVICES", {"cuda", DEVICE.type})
    launched = []
    run = kd._run

    def counting(step, args, direct):
        launched.append(step.kernel.__name__.strip("_") if hasattr(step.kernel, "__name__") else str(step.kernel))
        return run(step, args, direct)

    monkeypatch.setattr(kd, "_run", counting)
    return launched


def _tolerance(dtype):
    """(rtol, atol) for a value computed in fp32 and stored in ``dtype``, against fp64."""
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    return 1e-5 + eps, 1e-6 + eps / 64


def _case(batch, num_classes, dtype, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(batch, num_classes, generator=gen)).to(dtype).requires_grad_(True)
    t = (3 * torch.randn(batch, num_classes, generator=gen)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    labels[1::4] = IGNORE
    s, t, labels = (s.detach().to(DEVICE).requires_grad_(True), t.detach().to(DEVICE).requires_grad_(True),
                    labels.to(DEVICE))
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    kwargs = {"labels": labels, "ignore_index": IGNORE}
    if kind == "class":
        kwargs["teacher_temperature"] = 0.5 + 4 * torch.rand(num_classes, generator=gen, device=DEVICE)
        kwargs["student_temperature"] = torch.tensor(0.8, device=DEVICE)  # 0-d: a stride-0 view of its value
    elif kind == "row":
        kwargs.pop("labels")
        kwargs["teacher_temperature"] = 0.5 + 2 * torch.rand(batch, 1, generator=gen, device=DEVICE)
    elif kind == "weighted":
        kwargs["teacher_temperature"] = 0.5 + 4 * torch.rand(num_classes, generator=gen, device=DEVICE)
        kwargs["weight"] = 2 * torch.rand(num_classes, generator=gen, device=DEVICE)
        kwargs["sample_weight"] = 0.5 + torch.rand(batch, generator=gen, device=DEVICE)
    else:
        kwargs["teacher_temperature"], kwargs["student_temperature"] = 2.0, 0.7
    return s, t, kwargs


def _reference(s, t, kwargs, reduction):
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    double = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    return s64, t64, reference.kd_kl_div(s64, t64, reduction=reduction, **double)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["class", "row", "scalar", "weighted"])
@pytest.mark.parametrize("shape", [(9, 10), (5, 300)], ids=str)
def test_values_and_gradients_match_the_reference(cuda_path, shape, kind, dtype, reduction):
    s, t, kwargs = _case(*shape, dtype, kind, seed=shape[1])
    loss = kd_kl_div(s, t, reduction=reduction, **kwargs)
    assert "kd_tile_kernel" in cuda_path  # the Triton path ran
    grad_out = torch.rand_like(loss) + 0.5
    grads = torch.autograd.grad(loss, (s, t), grad_out)
    s64, t64, ref = _reference(s, t, kwargs, reduction)
    ref_grads = torch.autograd.grad(ref, (s64, t64), grad_out.double())
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for grad, ref_grad, x in zip(grads, ref_grads, (s, t)):
        assert grad.dtype == x.dtype
        rtol, atol = _tolerance(dtype)
        scale = ref_grad.abs().max().item()
        torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol * max(scale, 1e-30) * 64)


def test_split_form_and_strided_logits_match_the_reference(cuda_path):
    """Rows wider than a tile (the split form) and logits that are views, not contiguous rows."""
    gen = torch.Generator().manual_seed(1)
    s = (2 * torch.randn(3, 2 * 9000, generator=gen)).to(DEVICE)[:, ::2].requires_grad_(True)
    t = (2 * torch.randn(9000, 3, generator=gen)).to(DEVICE).t()
    labels = torch.tensor([1, IGNORE, 8999], device=DEVICE)
    tau = (0.5 + torch.rand(9000, generator=gen)).to(DEVICE)
    loss = kd_kl_div(s, t, labels=labels, teacher_temperature=tau, reduction="mean")
    assert cuda_path[:1] == ["kd_split_kernel"]  # the forward: one kernel (after its counters' memset)
    (grad,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_(True)
    ref = reference.kd_kl_div(s64, t.double(), labels, tau.double(), reduction="mean")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grad.double(), torch.autograd.grad(ref, s64)[0], rtol=1e-4, atol=1e-12)


def test_launches_two_forward_one_backward_and_no_other_device_work(cuda_path, monkeypatch):
    """Tile form: the row kernel and the finishing kernel, then one scaling kernel (the student's
    gradient, as ABSLD asks: the teacher's logits need none); no ATen compute op."""
    s, t, kwargs = _case(16, 10, torch.float32, "class")
    t = t.detach()
    kwargs["student_temperature"] = 0.8
    kd_kl_div(s, t, reduction="mean", **kwargs)  # plan and compile
    cuda_path.clear()
    # The kernels are recorded, not run: the interpreter's own tensor work would show in the profile.
    monkeypatch.setattr(kd_loss_triton.kernels(), "_run", lambda step, args, direct: cuda_path.append(
        step.kernel.__name__.strip("_")))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        loss = kd_kl_div(s, t, reduction="mean", **kwargs)
        forward = list(cuda_path)
        cuda_path.clear()
        torch.autograd.grad(loss, s)
    assert forward == ["kd_tile_kernel", "kd_reduce_kernel"]
    assert cuda_path == ["kd_scale_kernel"]
    # What runs on the device besides the Triton kernels would show as an ATen op here: only
    # allocations and views may appear (on a GPU they launch nothing).
    allowed = {"aten::empty", "aten::new_empty", "aten::empty_strided", "aten::detach", "aten::lift_fresh", "aten::view",
               "aten::contiguous", "aten::to", "aten::ones_like", "aten::fill_", "aten::empty_like"}
    ops = {event.name for event in profile.events() if event.name.startswith("aten::")}
    # ones_like/fill_ come from autograd.grad's implicit grad_output of a 0-d loss (the caller's).
    assert ops <= allowed, ops - allowed


def test_plan_is_cached_per_metadata(cuda_path, monkeypatch):
    kd = kd_loss_triton.kernels()
    made = []
    real = kd._static_plan
    monkeypatch.setattr(kd, "_static_plan", lambda *a, **k: made.append(1) or real(*a, **k))
    s, t, kwargs = _case(8, 12, torch.float32, "class", seed=5)
    for _ in range(3):
        kd_kl_div(s, t, reduction="sum", **kwargs)
    assert len(made) == 1
    kd_kl_div(s[:, :6], t[:, :6], labels=kwargs["labels"] % 6, reduction="sum")  # other strides and C
    kd_kl_div(s, t, reduction="mean", **kwargs)  # another reduction
    assert len(made) == 3


def test_cpu_scalars_stay_numbers_for_device_logits():
    """A 0-d CPU temperature or sample weight with logits elsewhere is read as a number (no copy)."""
    device = torch.device("cuda")  # only compared, nothing is allocated there
    tau, scalar = kd_loss._check_temperature(torch.tensor(2.5), "teacher_temperature", None, (4,), 10, device,
                                             torch.float32)
    assert tau is None and scalar == 2.5
    weight, scalar = kd_loss._check_sample_weight(torch.tensor(0.25, dtype=torch.float64), (4,), device,
                                                 torch.float32)
    assert weight is None and scalar == 0.25
    with pytest.raises(ValueError, match="teacher_temperature"):
        kd_loss._check_temperature(torch.tensor(-1.0), "teacher_temperature", None, (4,), 10, device, torch.float32)


def test_fp16_student_gradient_survives_many_columns(cuda_path):
    """At C = 20000 most of q - p lies below fp16's smallest normal: the gradient is kept in fp32
    until grad_output (here a loss scaler's 2**16) has scaled it, so the fp16 result is within
    fp16's rounding of the fp64 gradient (stored in fp16 first, the 90th percentile error was ~1e-2)."""
    gen = torch.Generator().manual_seed(3)
    s = (2 * torch.randn(2, 20000, generator=gen)).half().to(DEVICE).requires_grad_(True)
    t = (2 * torch.randn(2, 20000, generator=gen)).half().to(DEVICE)
    loss = kd_kl_div(s, t, reduction="sum")
    (grad,) = torch.autograd.grad(loss, s, torch.tensor(2.0 ** 16, device=DEVICE))
    s64 = s.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad(reference.kd_kl_div(s64, t.double(), reduction="sum") * 2.0 ** 16, s64)
    relative = ((grad.double() - ref).abs() / ref.abs().clamp_min(1e-300)).flatten()
    assert torch.quantile(relative, 0.9).item() <= 2.0 ** -11
    assert (grad[ref.abs() > 2.0 ** -14] != 0).all()


def test_double_backward_goes_through_the_traced_op(cuda_path):
    """A backward with create_graph recomputes through kd_kl_div_forward, so it is differentiable."""
    s, t, kwargs = _case(6, 10, torch.float32, "class", seed=2)
    loss = kd_kl_div(s, t, reduction="batchmean", **kwargs)
    (grad,) = torch.autograd.grad(loss, s, create_graph=True)
    assert grad.requires_grad
    s64, t64, ref = _reference(s, t, kwargs, "batchmean")
    torch.testing.assert_close(grad.double(), torch.autograd.grad(ref, s64)[0], rtol=1e-4, atol=1e-7)


def test_device_asserts_are_opt_in(monkeypatch):
    kd = kd_loss_triton.kernels()
    logits = torch.empty(4, 10, device="meta")
    labels = torch.zeros(4, dtype=torch.int64, device="meta")
    _, launches = kd.plan(logits, logits, labels, None, None, 1.0, 1.0, IGNORE, True, False)
    assert launches and not any(launch.options()["debug"] for launch in launches)
    monkeypatch.setattr(kd, "DEVICE_ASSERTS", True)
    _, launches = kd.plan(logits, logits, labels, None, None, 1.0, 1.0, IGNORE, True, False)
    assert all(launch.options()["debug"] for launch in launches)


TRACE_SCRIPT = """
import torch
from torch._dynamo.backends.common import aot_autograd
from benchmarks.triton_recorder import RecordingDriver
from fastabsld.loss import kd_kl_div
from fastabsld.ops import kd_loss_triton

graphs = []

def capture(gm, example_inputs):
    graphs.append(gm.code)
    return gm.forward

kd_loss_triton.TRACED_DEVICES.add("cpu")
gen = torch.Generator().manual_seed(0)
s = torch.randn(16, 10, generator=gen, requires_grad=True)
t = torch.randn(16, 10, generator=gen)
labels = torch.randint(0, 10, (16,), generator=gen)
tau = 0.5 + torch.rand(10, generator=gen)

def loss(s, t, labels, tau):
    return kd_kl_div(s, t, labels=labels, teacher_temperature=tau, reduction="mean")

with RecordingDriver() as recorder:
    compiled = torch.compile(loss, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture), fullgraph=True)
    compiled(s, t, labels, tau).backward()
    launched = [name for name, _ in recorder.launches]
    # Dynamic shapes: one forward and one backward graph serve two batch sizes, the batch symbolic.
    torch._dynamo.reset()
    dynamic = torch.compile(loss, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture), fullgraph=True,
                            dynamic=True)
    first = len(graphs)
    for batch in (16, 24):
        s = torch.randn(batch, 10, generator=gen, requires_grad=True)
        dynamic(s, torch.randn(batch, 10, generator=gen), torch.randint(0, 10, (batch,), generator=gen), tau).backward()
print(repr([len(graphs) - first, graphs[first]]))
print(repr(graphs[0]))
print(repr(launched))
"""


def test_compiled_graph_calls_the_triton_kernels():
    """Under torch.compile the loss traces the Triton op, which AOTAutograd decomposes into the
    kernel call itself (``triton_kernel_wrapper_functional`` on ``_kd_tile_kernel``), not an opaque
    custom op; Inductor can then launch it from its generated code. Traced in a fresh process
    without the interpreter (``wrap_triton`` needs a real kernel), Triton compiling for sm_90 and
    its launches recorded; CPU tensors stand in for CUDA ones. With ``dynamic=True`` two batch
    sizes share one traced graph."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    (dynamic_graphs, dynamic_graph), graph, launched = (ast.literal_eval(line) for line in done.stdout.splitlines()[-3:])
    assert "triton_kernel_wrapper_functional" in graph and "'s_ptr': primals_1" in graph
    assert "fastabsld" not in graph, "an opaque custom op is left in the graph"
    assert launched == ["_kd_tile_kernel"]
    # Under dynamic=True the batch is a graph input (the grid and B follow it): no recompile.
    assert dynamic_graphs == 2, dynamic_graphs
    assert "triton_kernel_wrapper_functional" in dynamic_graph and "'B': primals_1" in dynamic_graph


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_row_ignored_gives_zero_loss_and_zero_gradients(cuda_path, reduction):
    """A padding-only batch contributes nothing: the same rule as the C++ and fallback kernels."""
    s, t, kwargs = _case(8, 10, torch.float32, "class")
    kwargs["labels"] = torch.full_like(kwargs["labels"], IGNORE)
    loss = kd_kl_div(s, t, reduction=reduction, **kwargs)
    assert cuda_path, "the eager CUDA path ran"
    assert torch.equal(loss.detach().cpu(), torch.zeros_like(loss).cpu())
    loss.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(t.grad, torch.zeros_like(t))


def _ref_mean(s, t, kwargs):
    s64, t64, ref = _reference(s, t, kwargs, "mean")
    return ref, torch.autograd.grad(ref, s64)[0]


def test_a_remembered_call_launches_without_the_checks(cuda_path, monkeypatch):
    """The second call with the same metadata (new values) runs no public check and builds no plan,
    makes the same launches, and still matches the reference."""
    checks, plans = [], []
    check_logits, eager_plan = kd_loss._check_logits, kd_loss_triton.kernels().eager_plan
    monkeypatch.setattr(kd_loss, "_check_logits", lambda *a: checks.append(1) or check_logits(*a))
    monkeypatch.setattr(kd_loss_triton.kernels(), "eager_plan", lambda *a: plans.append(1) or eager_plan(*a))
    kd_loss._EAGER_CALLS.clear()
    for seed in (1, 2):
        s, t, kwargs = _case(9, 10, torch.float32, "class", seed=seed)
        t = t.detach()
        kwargs["student_temperature"] = 0.8  # a number: checked on every call
        cuda_path.clear()
        loss = kd_kl_div(s, t, reduction="mean", **kwargs)
        (grad,) = torch.autograd.grad(loss, s)
        assert cuda_path == ["kd_tile_kernel", "kd_reduce_kernel", "kd_scale_kernel"]
        ref, ref_grad = _ref_mean(s, t, kwargs)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    assert checks == [1] and plans == [1]
    with pytest.raises(ValueError, match="positive"):
        kd_kl_div(s, t, reduction="mean", **dict(kwargs, student_temperature=-0.8))


def test_the_loss_node_and_its_fallback_give_the_same_gradients(cuda_path, monkeypatch):
    """With the extension the loss's grad_fn is its own node (``attach_backward``); without it a
    torch.autograd.Function: the same launches and gradients, and both refuse a second backward."""
    s, t, kwargs = _case(9, 10, torch.float32, "weighted", seed=4)
    results = []
    node = kd_loss_triton._ATTACH_BACKWARD
    for attach in (node, None):
        monkeypatch.setattr(kd_loss_triton, "_ATTACH_BACKWARD", attach)
        kd_loss._EAGER_CALLS.clear()
        cuda_path.clear()
        loss = kd_kl_div(s, t, reduction="batchmean", **kwargs)
        grads = torch.autograd.grad(loss, (s, t))
        assert cuda_path == ["kd_tile_kernel", "kd_reduce_kernel", "kd_scale_kernel", "kd_scale_kernel"]
        with pytest.raises(RuntimeError, match="second time"):
            torch.autograd.grad(loss, (s, t))
        results.append((loss, grads, loss.grad_fn.name()))
    (loss, grads, name), (loss_f, grads_f, name_f) = results
    assert torch.equal(loss, loss_f) and all(torch.equal(a, b) for a, b in zip(grads, grads_f))
    assert name_f == "_KdLossBackward"
    assert name == ("KdKlDivBackward" if node is not None else "_KdLossBackward")
    s64, t64, ref = _reference(s, t, kwargs, "batchmean")
    for grad, ref_grad in zip(grads, torch.autograd.grad(ref, (s64, t64))):
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


def test_create_graph_after_an_inplace_change_of_the_logits_is_refused(cuda_path):
    s, t, kwargs = _case(6, 10, torch.float32, "class", seed=2)
    student = s.detach().clone().requires_grad_(True)
    logits = student * 1.0  # not a leaf: it may be changed in place
    loss = kd_kl_div(logits, t.detach(), reduction="sum", **kwargs)
    with torch.no_grad():
        logits.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, student, create_graph=True)
