"""fastabsld.loss.kd_kl_div and KDLoss against fastabsld.reference.kd_kl_div: reductions,
gradients (both paths: the eager bypass and the compile-visible op), compile, opcheck,
gradcheck, property tests and argument errors."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastabsld import HAS_EXTENSION, reference
from fastabsld.ops import kd_loss
from fastabsld.loss import KDLoss, kd_kl_div
from fastabsld.ops.kd_loss import REDUCTIONS


@pytest.fixture(params=["eager", "op"])
def path(request, monkeypatch):
    """Runs a test through the eager C++ loss op and through the compile-visible custom op."""
    if request.param == "op":
        monkeypatch.setattr(kd_loss, "_eager_fast_path", lambda *tensors: False)
    return request.param


def make(batch, num_classes, dtype=torch.float32, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(batch, num_classes, generator=gen)).to(dtype)
    t = (scale * torch.randn(batch, num_classes, generator=gen)).to(dtype)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return s, t, labels


def temperature_of(kind, batch, num_classes):
    gen = torch.Generator().manual_seed(5)
    return {
        "number": 2.5,
        "0d": torch.tensor(0.6),
        "per_class": 0.5 + 4 * torch.rand(num_classes, generator=gen),
        "per_row": 0.5 + 4 * torch.rand(batch, generator=gen),
    }[kind]


def loss_and_grads(fn, s, t, grad_output, **kwargs):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    out = fn(s, t, **kwargs)
    out.backward(grad_output(out))
    return out.detach(), s.grad, t.grad


def compare(s, t, grad_output=lambda out: torch.full_like(out, 2.5), rtol=1e-5, atol=1e-5, **kwargs):
    got = loss_and_grads(kd_kl_div, s, t, grad_output, **kwargs)
    ref_kwargs = dict(kwargs)
    args = [ref_kwargs.pop(k, d) for k, d in (("labels", None), ("teacher_temperature", 1.0),
                                              ("student_temperature", 1.0))]
    want = loss_and_grads(lambda a, b, **kw: reference.kd_kl_div(a, b, *args, **kw), s, t, grad_output, **ref_kwargs)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype or g.dtype == s.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=atol)
    return got


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["number", "0d", "per_class", "per_row"])
def test_reductions_and_temperatures(path, reduction, kind):
    batch, num_classes = 33, 10
    s, t, labels = make(batch, num_classes)
    labels[[3, 20]] = -1
    tau = temperature_of(kind, batch, num_classes)
    with_labels = kind != "per_row"
    compare(s, t, labels=labels if with_labels else None, teacher_temperature=tau, student_temperature=1.5,
            reduction=reduction, ignore_index=-1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_stride_zero_and_row_grad_outputs(path, reduction):
    s, t, labels = make(17, 6, seed=3)
    tau = temperature_of("per_class", 17, 6)
    # .sum().backward() on "none" hands backward an expanded (stride-0) gradient.
    compare(s, t, grad_output=lambda out: torch.ones(()).expand(out.shape), labels=labels,
            teacher_temperature=tau, reduction=reduction)
    if reduction == "none":
        compare(s, t, grad_output=lambda out: torch.linspace(-2, 3, out.shape[0]), labels=labels,
                teacher_temperature=tau, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_in_logits_dtype(path, dtype):
    s, t, labels = make(64, 100, dtype, seed=4)
    loss, grad_s, grad_t = compare(s, t, rtol=2e-2, atol=2e-4, labels=labels,
                                   teacher_temperature=temperature_of("per_class", 64, 100), reduction="sum")
    assert loss.dtype == torch.float32 and grad_s.dtype == dtype and grad_t.dtype == dtype


def test_student_only_gradient_and_no_grad_modes(path):
    s, t, labels = make(8, 5)
    s.requires_grad_(True)
    kd_kl_div(s, t, labels=labels, teacher_temperature=temperature_of("per_class", 8, 5)).backward()
    assert s.grad is not None and t.grad is None
    want = reference.kd_kl_div(s.detach(), t, reduction="sum")
    with torch.no_grad():
        value = kd_kl_div(s, t, reduction="sum")
    assert value.grad_fn is None
    torch.testing.assert_close(value, want)
    with torch.inference_mode():
        value = kd_kl_div(s.detach().clone(), t.clone(), reduction="sum")
    torch.testing.assert_close(value, want)


def test_teacher_only_gradient(path):
    s, t, labels = make(8, 5, seed=2)
    t.requires_grad_(True)
    tau = temperature_of("per_class", 8, 5)
    kd_kl_div(s, t, labels=labels, teacher_temperature=tau, reduction="sum").backward()
    t_ref = t.detach().clone().requires_grad_(True)
    reference.kd_kl_div(s, t_ref, labels, tau, reduction="sum").backward()
    assert s.grad is None
    torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-5, atol=1e-6)


def test_non_contiguous_and_inputs_untouched(path):
    s, t, labels = make(30, 24, seed=6)
    s, t = s.t().contiguous().t()[::2], t[:, ::2].repeat(1, 2)[::2]
    before = s.clone(), t.clone()
    compare(s, t, labels=labels[::2], teacher_temperature=temperature_of("per_class", 15, 24), reduction="mean")
    assert torch.equal(before[0], s) and torch.equal(before[1], t)


def test_all_rows_ignored_matches_reference():
    s, t, _ = make(4, 3)
    labels = torch.full((4,), -100)
    for reduction in REDUCTIONS:
        got = kd_kl_div(s, t, labels=labels, reduction=reduction)
        torch.testing.assert_close(got, reference.kd_kl_div(s, t, labels, reduction=reduction), equal_nan=True)


def test_fp64_gradcheck(path):
    s, t, labels = make(4, 5, torch.float64, seed=8)
    labels[1] = -100
    tau = temperature_of("per_class", 4, 5).double()
    for reduction in ("none", "mean"):
        def fn(a, b):
            return kd_kl_div(a, b, labels=labels, teacher_temperature=tau, student_temperature=0.7,
                             reduction=reduction)
        assert torch.autograd.gradcheck(fn, (s.requires_grad_(True), t.requires_grad_(True)))


def test_opcheck():
    s, t, labels = make(6, 7, seed=9)
    tau = temperature_of("per_class", 6, 7)
    samples = [
        (s.requires_grad_(True), t, labels, tau, None, 1.0, 1.0, -100, True, False),
        (s, t.requires_grad_(True), None, None, torch.full((6,), 0.5), 2.0, 1.0, -100, True, True),
        (s.detach().bfloat16(), t.detach(), labels, None, None, 0.5, 3.0, 3, False, False),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.fastabsld.kd_kl_div_forward.default, args)
    if HAS_EXTENSION:  # the eager loss op (C++ autograd)
        for reduction in ("none", "mean"):
            torch.library.opcheck(torch.ops.fastabsld.kd_kl_div_loss.default,
                                  (s, t, labels, tau, None, 1.0, 1.0, -100, reduction))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    s, t, labels = make(8, 10, seed=10)
    tau = temperature_of("per_class", 8, 10)
    module = KDLoss(teacher_temperature=tau, reduction="mean")

    def step(student, teacher, y):
        return module(student * 2.0, teacher, labels=y)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    got = loss_and_grads(lambda a, b: compiled(a, b, labels), s, t, lambda out: torch.ones_like(out))
    want = loss_and_grads(lambda a, b: reference.kd_kl_div(a * 2.0, b, labels, tau, reduction="mean"), s, t,
                          lambda out: torch.ones_like(out))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 12), num_classes=st.integers(1, 40), tau_t=st.floats(0.05, 50),
       tau_s=st.floats(0.05, 50), scale=st.sampled_from([0.01, 1.0, 30.0, 1e3]), per_class=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_matches_reference(batch, num_classes, tau_t, tau_s, scale, per_class, seed):
    s, t, labels = make(batch, num_classes, seed=seed, scale=scale)
    teacher_tau = torch.full((num_classes,), tau_t) if per_class else tau_t
    # The tempered logits carry fp32 rounding of ~1e-7 * scale / tau; the teacher gradient
    # multiplies that by 1 / tau again.
    atol = 1e-5 + 1e-6 * scale / min(tau_t, tau_s) ** 2
    loss, grad_s, _ = compare(s, t, rtol=1e-4, atol=atol, labels=labels if per_class else None,
                              teacher_temperature=teacher_tau, student_temperature=tau_s, reduction="batchmean")
    assert loss >= -1e-5
    torch.testing.assert_close(grad_s.sum(dim=1), torch.zeros(batch), atol=1e-5, rtol=0)


def test_kdloss_module_buffers_and_state():
    tau = torch.tensor([1.0, 2.0, 0.5])
    module = KDLoss(teacher_temperature=tau, student_temperature=2.0, reduction="sum", ignore_index=-1)
    assert "teacher_temperature" in module.state_dict() and module.teacher_temperature is not tau
    tau[0] = 9.0  # the module keeps its own copy
    module = module.to(torch.float64)
    s, t, labels = make(5, 3, seed=12)
    labels[0] = -1
    want = reference.kd_kl_div(s, t, labels, torch.tensor([1.0, 2.0, 0.5]), 2.0, "sum", -1)
    torch.testing.assert_close(module(s, t, labels), want)
    with pytest.raises(ValueError, match="reduction"):
        KDLoss(reduction="avg")


BAD_CALLS = [
    (dict(s=(4, 5), t=(4, 6)), "same shape"),
    (dict(s=(4, 5, 1), t=(4, 5, 1)), r"shape \(B, C\)"),
    (dict(s=(4, 0), t=(4, 0)), "at least one class"),
    (dict(labels=torch.zeros(4)), "integer"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), r"labels must have shape \(4,\)"),
    (dict(teacher_temperature=0.0), "teacher_temperature must be positive"),
    (dict(student_temperature=float("nan")), "student_temperature must be positive"),
    (dict(teacher_temperature=float("inf")), "teacher_temperature must be positive"),
    (dict(teacher_temperature="2"), "teacher_temperature must be a number"),
    (dict(teacher_temperature=torch.ones(4)), r"length C=5 \(with labels\)"),
    (dict(labels=None, teacher_temperature=torch.ones(5)), r"length B=4 \(without labels\)"),
    (dict(student_temperature=torch.ones(2, 5)), r"got shape \(2, 5\)"),
    (dict(teacher_temperature=torch.ones(5, dtype=torch.long)), "floating-point"),
    (dict(teacher_temperature=torch.ones(5, requires_grad=True)), "must not require grad"),
    (dict(reduction="avg"), "reduction"),
    (dict(ignore_index=1.5), "ignore_index"),
    (dict(s_dtype=torch.int64), "fp32, fp16, bf16"),
]


@pytest.mark.parametrize("case,message", BAD_CALLS, ids=[m for _, m in BAD_CALLS])
def test_bad_arguments_raise_value_error(case, message):
    case = dict(case)
    s = torch.randn(case.pop("s", (4, 5))).to(case.pop("s_dtype", torch.float32))
    t = torch.randn(case.pop("t", (4, 5)))
    kwargs = dict(labels=torch.tensor([0, 1, 2, 3]))
    kwargs.update(case)
    with pytest.raises(ValueError, match=message):
        kd_kl_div(s, t, **kwargs)


@pytest.mark.parametrize("batch", [4, 8000], ids=["serial", "parallel_rows"])  # grain: 16384 / C rows
@pytest.mark.parametrize("bad", ["label", "temperature"])
def test_bad_values_in_tensors_raise(bad, batch):
    s, t, labels = make(batch, 5)
    labels[batch // 2] = 9 if bad == "label" else 2
    tau = torch.tensor([1.0, 1.0, -2.0, 1.0, 1.0]) if bad == "temperature" else torch.ones(5)
    with pytest.raises(RuntimeError, match="labels|temperature"):
        kd_kl_div(s, t, labels=labels, teacher_temperature=tau)
