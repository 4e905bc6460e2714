"""fastabsld.loss.kd_kl_div and KDLoss against fastabsld.reference.kd_kl_div: reductions, temperatures,
weights, gradients (both paths: the eager C++ loss op and the compile-visible op), empty batches,
compile, opcheck, gradcheck, property tests and argument errors."""

import math
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastabsld import HAS_EXTENSION, reference
from fastabsld.loss import KDLoss, kd_kl_div
from fastabsld.ops import kd_loss
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
        "per_row": 0.5 + 4 * torch.rand(batch, 1, generator=gen),
    }[kind]


def weights_of(kind, batch, num_classes):
    """(weight, sample_weight) keyword values for a weighting kind; one class weight is exactly 0."""
    gen = torch.Generator().manual_seed(6)
    weight = 2 * torch.rand(num_classes, generator=gen)
    weight[min(1, num_classes - 1)] = 0.0
    sample = 0.1 + 2 * torch.rand(batch, generator=gen)
    return {"unweighted": (None, None), "class": (weight, None), "sample": (None, sample), "number": (None, 0.25),
            "0d": (None, torch.tensor(1.75)), "both": (weight, sample)}[kind]


def loss_and_grads(fn, s, t, grad_output, **kwargs):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    out = fn(s, t, **kwargs)
    out.backward(grad_output(out))
    return out.detach(), s.grad, t.grad


def reference_fn(**kwargs):
    """The reference with the public function's keywords."""
    positional = [kwargs.pop(k, d) for k, d in (("labels", None), ("teacher_temperature", 1.0),
                                                ("student_temperature", 1.0))]
    return lambda a, b, **kw: reference.kd_kl_div(a, b, *positional, **kwargs, **kw)


def compare(s, t, grad_output=lambda out: torch.full_like(out, 2.5), rtol=1e-5, atol=1e-5, **kwargs):
    got = loss_and_grads(kd_kl_div, s, t, grad_output, **kwargs)
    ref_kwargs = dict(kwargs)
    reduction = ref_kwargs.pop("reduction", "batchmean")
    want = loss_and_grads(reference_fn(**ref_kwargs), s, t, grad_output, reduction=reduction)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype or g.dtype == s.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=atol, equal_nan=True)
    return got


# (temperature kind, with labels, weighting): every kind unweighted and fully weighted, every
# weighting with per-class temperatures, and the kinds that need no labels without them.
CASES = [(k, True, w) for k in ("number", "0d", "per_class", "per_row") for w in ("unweighted", "both")] + \
    [("per_class", True, w) for w in ("class", "sample", "number", "0d")] + \
    [("per_row", False, w) for w in ("unweighted", "sample", "number")] + \
    [("number", False, "unweighted"), ("0d", False, "0d")]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind,with_labels,weighting", CASES,
                         ids=[f"{k}-{'labels' if y else 'nolabels'}-{w}" for k, y, w in CASES])
def test_reductions_temperatures_and_weights(path, reduction, kind, with_labels, weighting):
    batch, num_classes = 33, 10
    s, t, labels = make(batch, num_classes)
    labels[[3, 20]] = -1
    weight, sample_weight = weights_of(weighting, batch, num_classes)
    compare(s, t, labels=labels if with_labels else None, teacher_temperature=temperature_of(kind, batch, num_classes),
            student_temperature=1.5, reduction=reduction, ignore_index=-1, weight=weight, sample_weight=sample_weight)


def test_weighted_reductions_count_rows_not_weights(path):
    """batchmean divides by the counted rows and mean by counted rows * C, whatever the weights sum to."""
    s, t, labels = make(6, 4, seed=1)
    labels[2] = -100
    weight = torch.tensor([0.5, 2.0, 0.0, 3.0])
    sample_weight = torch.tensor([1.0, 0.25, 9.0, 2.0, 0.5, 1.5])
    rows = kd_kl_div(s, t, labels=labels, reduction="none", weight=weight, sample_weight=sample_weight)
    plain = reference.kd_kl_div(s, t, labels, reduction="none")
    w = weight[labels.clamp(min=0)] * sample_weight
    torch.testing.assert_close(rows, torch.where(labels != -100, w * plain, torch.zeros(())))
    for reduction, divisor in (("sum", 1), ("batchmean", 5), ("mean", 5 * 4)):
        got = kd_kl_div(s, t, labels=labels, reduction=reduction, weight=weight, sample_weight=sample_weight)
        torch.testing.assert_close(got, rows.sum() / divisor)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_stride_zero_and_row_grad_outputs(path, reduction):
    s, t, labels = make(17, 6, seed=3)
    tau = temperature_of("per_class", 17, 6)
    weight, sample_weight = weights_of("both", 17, 6)
    for weights in ({}, {"weight": weight, "sample_weight": sample_weight}):
        # .sum().backward() on "none" hands backward an expanded (stride-0) gradient.
        compare(s, t, grad_output=lambda out: torch.ones(()).expand(out.shape), labels=labels,
                teacher_temperature=tau, reduction=reduction, **weights)
        if reduction == "none":
            compare(s, t, grad_output=lambda out: torch.linspace(-2, 3, out.shape[0]), labels=labels,
                    teacher_temperature=tau, reduction=reduction, **weights)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_retain_graph_and_second_backward(path, reduction):
    """backward twice on one graph: the stored gradient is scaled, never consumed or overwritten."""
    s, t, labels = make(9, 7, seed=13)
    s.requires_grad_(True)
    t.requires_grad_(True)
    weight, sample_weight = weights_of("both", 9, 7)
    kwargs = dict(labels=labels, teacher_temperature=temperature_of("per_row", 9, 7), reduction=reduction,
                  weight=weight, sample_weight=sample_weight)
    out = kd_kl_div(s, t, **kwargs)
    out.sum().backward(retain_graph=True)
    first = s.grad.clone(), t.grad.clone()
    out.sum().backward()
    s_ref = s.detach().clone().requires_grad_(True)
    t_ref = t.detach().clone().requires_grad_(True)
    reference_fn(**kwargs)(s_ref, t_ref).sum().backward()
    for got, want in ((first[0], s_ref.grad), (first[1], t_ref.grad), (s.grad, 2 * s_ref.grad),
                      (t.grad, 2 * t_ref.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_in_logits_dtype(path, dtype):
    s, t, labels = make(64, 100, dtype, seed=4)
    weight, sample_weight = weights_of("both", 64, 100)
    loss, grad_s, grad_t = compare(s, t, rtol=2e-2, atol=2e-4, labels=labels,
                                   teacher_temperature=temperature_of("per_class", 64, 100), reduction="sum",
                                   weight=weight.to(dtype), sample_weight=sample_weight)
    assert loss.dtype == torch.float32 and grad_s.dtype == dtype and grad_t.dtype == dtype


def test_student_only_gradient_and_no_grad_modes(path):
    s, t, labels = make(8, 5)
    s.requires_grad_(True)
    kd_kl_div(s, t, labels=labels, teacher_temperature=temperature_of("per_class", 8, 5)).backward()
    assert s.grad is not None and t.grad is None
    weight = torch.rand(5, requires_grad=True)  # allowed where no gradient is recorded
    want = reference.kd_kl_div(s.detach(), t, labels, reduction="sum", weight=weight.detach())
    with torch.no_grad():
        value = kd_kl_div(s, t, labels=labels, reduction="sum", weight=weight)
    assert value.grad_fn is None
    torch.testing.assert_close(value, want)
    with torch.inference_mode():
        value = kd_kl_div(s.detach().clone(), t.clone(), labels=labels, reduction="sum", weight=weight.detach())
    torch.testing.assert_close(value, want)


def test_teacher_only_gradient(path):
    s, t, labels = make(8, 5, seed=2)
    t.requires_grad_(True)
    tau = temperature_of("per_class", 8, 5)
    weight, sample_weight = weights_of("both", 8, 5)
    kd_kl_div(s, t, labels=labels, teacher_temperature=tau, reduction="sum", weight=weight,
              sample_weight=sample_weight).backward()
    t_ref = t.detach().clone().requires_grad_(True)
    reference.kd_kl_div(s, t_ref, labels, tau, reduction="sum", weight=weight, sample_weight=sample_weight).backward()
    assert s.grad is None
    torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-5, atol=1e-6)


def test_non_contiguous_and_inputs_untouched(path):
    s, t, labels = make(30, 24, seed=6)
    s, t = s.t().contiguous().t()[::2], t[:, ::2].repeat(1, 2)[::2]
    weight = torch.rand(48, generator=torch.Generator().manual_seed(1))[::2]
    sample_weight = torch.rand(15, 2, generator=torch.Generator().manual_seed(2))[:, 1]
    tau_rows = (0.5 + torch.rand(15, 3, generator=torch.Generator().manual_seed(3)))[:, 1:2]
    inputs = (s, t, weight, sample_weight, tau_rows)
    before = [x.clone() for x in inputs]
    compare(s, t, labels=labels[::2], teacher_temperature=temperature_of("per_class", 15, 24), reduction="mean",
            weight=weight, sample_weight=sample_weight)
    compare(s, t, labels=labels[::2], teacher_temperature=tau_rows, reduction="none", weight=weight)
    assert all(torch.equal(a, b) for a, b in zip(before, inputs))


def test_all_rows_ignored_matches_reference():
    s, t, _ = make(4, 3)
    labels = torch.full((4,), -100)
    for reduction in REDUCTIONS:
        got = kd_kl_div(s, t, labels=labels, reduction=reduction, weight=torch.ones(3))
        torch.testing.assert_close(got, reference.kd_kl_div(s, t, labels, reduction=reduction), equal_nan=True)


EMPTY_CASES = {
    "plain": {},
    "labels": {"labels": True},
    "class_temperature": {"labels": True, "teacher_temperature": torch.ones(5)},
    "row_temperature": {"student_temperature": torch.ones(0, 1)},
    "0d_temperature": {"teacher_temperature": torch.tensor(2.0)},
    "weights": {"labels": True, "weight": torch.ones(5), "sample_weight": torch.ones(0)},
    "everything": {"labels": True, "teacher_temperature": torch.ones(5), "student_temperature": torch.ones(0, 1),
                   "weight": torch.ones(5), "sample_weight": 2.0},
}
EMPTY_RESULTS = {"none": torch.zeros(0), "sum": torch.tensor(0.0), "batchmean": torch.tensor(0.0),
                 "mean": torch.tensor(0.0)}


def empty_kwargs(case):
    kwargs = dict(EMPTY_CASES[case])
    if kwargs.pop("labels", False):
        kwargs["labels"] = torch.zeros(0, dtype=torch.long)
    return kwargs


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_empty_batch(path, case, reduction):
    """B = 0: "none" -> (0,), every other reduction -> 0, zero-size gradients, on every path."""
    s = torch.randn(0, 5, requires_grad=True)
    t = torch.randn(0, 5, requires_grad=True)
    out = kd_kl_div(s, t, reduction=reduction, **empty_kwargs(case))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, EMPTY_RESULTS[reduction], equal_nan=True)
    out.sum().backward()
    assert s.grad.shape == (0, 5) and t.grad.shape == (0, 5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_empty_batch(backend):
    torch._dynamo.reset()

    def losses(student, teacher, **kwargs):
        return [kd_kl_div(student, teacher, reduction=r, **kwargs) for r in REDUCTIONS]

    compiled = torch.compile(losses, fullgraph=True, backend=backend)
    for case in ("everything",):
        s = torch.randn(0, 5, requires_grad=True)
        t = torch.randn(0, 5)
        outs = compiled(s, t, **empty_kwargs(case))
        for reduction, out in zip(REDUCTIONS, outs):
            torch.testing.assert_close(out, EMPTY_RESULTS[reduction], equal_nan=True)
        torch.stack([o.sum() for o in outs]).sum().backward()
        assert s.grad.shape == (0, 5)


def test_fp64_gradcheck(path):
    s, t, labels = make(4, 5, torch.float64, seed=8)
    labels[1] = -100
    tau = temperature_of("per_class", 4, 5).double()
    weight = torch.tensor([0.5, 1.5, 2.0, 0.0, 1.0], dtype=torch.float64)
    for reduction in ("none", "mean"):
        for weights in ({}, {"weight": weight, "sample_weight": torch.tensor([1.0, 2.0, 0.5, 3.0])}):
            def fn(a, b):
                return kd_kl_div(a, b, labels=labels, teacher_temperature=tau, student_temperature=0.7,
                                 reduction=reduction, **weights)
            assert torch.autograd.gradcheck(fn, (s.requires_grad_(True), t.requires_grad_(True)))
        rows_tau = torch.tensor([[0.5], [1.0], [3.0], [0.8]], dtype=torch.float64)

        def fn_rows(a, b):
            return kd_kl_div(a, b, teacher_temperature=rows_tau, reduction=reduction, sample_weight=0.3)
        assert torch.autograd.gradcheck(fn_rows, (s, t))


def test_opcheck():
    s, t, labels = make(6, 7, seed=9)
    tau = temperature_of("per_class", 6, 7)
    weight = torch.rand(7, generator=torch.Generator().manual_seed(3))
    sample_weight = torch.rand(6, generator=torch.Generator().manual_seed(4))
    samples = [
        (s.requires_grad_(True), t, labels, tau, None, 1.0, 1.0, -100, True, False),
        (s, t.requires_grad_(True), None, None, torch.full((6, 1), 0.5), 2.0, 1.0, -100, True, True),
        (s.detach().bfloat16(), t.detach(), labels, None, None, 0.5, 3.0, 3, False, False),
        (s, t, labels, tau, torch.full((6, 1), 0.5), 1.0, 1.0, -100, True, True, weight, sample_weight, 1.0),
        (s, t, None, None, None, 1.0, 2.0, -100, True, False, None, sample_weight, 0.5),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.fastabsld.kd_kl_div_forward.default, args)
    if HAS_EXTENSION:  # the eager loss op (C++ autograd)
        torch.library.opcheck(torch.ops.fastabsld.kd_kl_div_loss.default,
                              (s, t, labels, tau, None, 1.0, 1.0, -100, "none"))
        torch.library.opcheck(torch.ops.fastabsld.kd_kl_div_loss.default,
                              (s, t, labels, tau, None, 1.0, 1.0, -100, "mean", weight, sample_weight, 0.5))


@pytest.mark.skipif(not HAS_EXTENSION, reason="the eager loss op is the C++ extension's")
def test_eager_loss_runs_no_python_autograd():
    """The eager C++ loss op calls the forward op below autograd: no Python round trip per loss (about 13 us
    of a 128 x 10 loss's 40)."""
    s, t, labels = make(128, 10, seed=2)
    s.requires_grad_(True)
    entered = []

    def spy(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith(os.path.join("torch", "_library", "autograd.py")):
            entered.append(frame.f_code.co_name)

    sys.setprofile(spy)
    try:
        loss = kd_kl_div(s, t, labels=labels, teacher_temperature=temperature_of("per_class", 128, 10))
        loss.backward()
    finally:
        sys.setprofile(None)
    assert entered == [] and s.grad is not None
    # The spy does see the Python autograd kernel when the op is called through it (the compile path's op).
    sys.setprofile(spy)
    try:
        with torch.no_grad():
            torch.ops.fastabsld.kd_kl_div_forward(s, t, labels, None, None, 1.0, 1.0, -100, True, False)
    finally:
        sys.setprofile(None)
    assert entered


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    s, t, labels = make(8, 10, seed=10)
    tau = temperature_of("per_class", 8, 10)
    weight, sample_weight = weights_of("both", 8, 10)
    unweighted = KDLoss(teacher_temperature=tau, reduction="mean")
    weighted = KDLoss(teacher_temperature=tau, student_temperature=temperature_of("per_row", 8, 10),
                      reduction="batchmean", weight=weight)

    def step(student, teacher, y):
        return unweighted(student * 2.0, teacher, labels=y) + weighted(student, teacher, labels=y,
                                                                       sample_weight=sample_weight)

    def ref(student, teacher):
        return reference.kd_kl_div(student * 2.0, teacher, labels, tau, reduction="mean") + reference.kd_kl_div(
            student, teacher, labels, tau, temperature_of("per_row", 8, 10), "batchmean", weight=weight,
            sample_weight=sample_weight)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    got = loss_and_grads(lambda a, b: compiled(a, b, labels), s, t, lambda out: torch.ones_like(out))
    want = loss_and_grads(ref, s, t, lambda out: torch.ones_like(out))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 12), num_classes=st.integers(1, 40), tau_t=st.floats(0.05, 50),
       tau_s=st.floats(0.05, 50), scale=st.sampled_from([0.01, 1.0, 30.0, 1e3]),
       kind=st.sampled_from(["number", "per_class", "per_row"]),
       weighting=st.sampled_from(["unweighted", "class", "sample", "number", "both"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_property_matches_reference(batch, num_classes, tau_t, tau_s, scale, kind, weighting, dtype, seed):
    s, t, labels = make(batch, num_classes, dtype=dtype, seed=seed, scale=scale)
    teacher_tau = {"number": tau_t, "per_class": torch.full((num_classes,), tau_t),
                   "per_row": torch.full((batch, 1), tau_t)}[kind]
    weight, sample_weight = weights_of(weighting, batch, num_classes)
    with_labels = kind == "per_class" or weight is not None
    # The tempered logits carry the compute dtype's rounding, eps * scale / tau; the teacher
    # gradient multiplies that by 1 / tau again; weights scale both.
    eps = torch.finfo(dtype).eps
    w_max = (2.0 if weight is not None else 1.0) * (2.1 if isinstance(sample_weight, torch.Tensor) else 1.0)
    atol = 64 * eps * (1 + scale / min(tau_t, tau_s)) * (1 + 1 / min(tau_t, tau_s)) * w_max
    loss, grad_s, _ = compare(s, t, rtol=64 * eps, atol=atol, labels=labels if with_labels else None,
                              teacher_temperature=teacher_tau, student_temperature=tau_s, reduction="batchmean",
                              weight=weight, sample_weight=sample_weight)
    assert loss >= -atol
    torch.testing.assert_close(grad_s.sum(dim=1), torch.zeros(batch, dtype=dtype), atol=atol, rtol=0)


def test_kdloss_module_buffers_and_state():
    tau = torch.tensor([1.0, 2.0, 0.5])
    weight = torch.tensor([0.5, 1.0, 2.0])
    module = KDLoss(teacher_temperature=tau, student_temperature=2.0, reduction="sum", ignore_index=-1, weight=weight)
    assert {"teacher_temperature", "weight"} <= set(module.state_dict()) and module.teacher_temperature is not tau
    tau[0] = 9.0  # the module keeps its own copies
    weight[0] = 9.0
    module = module.to(torch.float64)
    assert module.weight.dtype == torch.float64
    s, t, labels = make(5, 3, seed=12)
    labels[0] = -1
    sample_weight = torch.tensor([1.0, 0.5, 2.0, 1.5, 3.0])
    want = reference.kd_kl_div(s, t, labels, torch.tensor([1.0, 2.0, 0.5]), 2.0, "sum", -1,
                               torch.tensor([0.5, 1.0, 2.0]), sample_weight)
    torch.testing.assert_close(module(s, t, labels, sample_weight=sample_weight), want)
    assert "weight" not in KDLoss().state_dict()
    rows = KDLoss(teacher_temperature=torch.full((5, 1), 0.5), reduction="none")(s, t)
    torch.testing.assert_close(rows, reference.kd_kl_div(s, t, None, torch.full((5, 1), 0.5), reduction="none"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(reduction="avg"), "reduction"),
    (dict(ignore_index=1.5), "ignore_index"),
    (dict(teacher_temperature=0.0), "teacher_temperature must be positive"),
    (dict(student_temperature=float("inf")), "student_temperature must be positive"),
    (dict(teacher_temperature="2"), "teacher_temperature must be a number"),
    (dict(teacher_temperature=torch.ones(3, dtype=torch.long)), "floating-point"),
    (dict(student_temperature=torch.ones(2, 3)), r"\(\.\.\., 1\) \(per row"),
    (dict(teacher_temperature=torch.tensor([1.0, -1.0])), "positive finite"),
    (dict(weight=torch.ones(3, dtype=torch.long)), "weight must be a floating-point"),
    (dict(weight=torch.ones(3, 1)), r"weight must have shape \(C,\)"),
    (dict(weight=torch.tensor([1.0, float("nan")])), "non-negative finite"),
    (dict(weight=2.0), "weight must be None or a"),
])
def test_kdloss_checks_its_arguments_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KDLoss(**kwargs)


META = torch.device("meta")  # a device other than the logits'
BAD_CALLS = [
    (dict(s=(4, 5), t=(4, 6)), "same shape"),
    (dict(s=(5,), t=(5,)), r"shape \(\.\.\., C\) with at least one leading"),
    (dict(s=(4, 0), t=(4, 0)), "at least one class"),
    (dict(labels=torch.zeros(4)), "integer"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), r"labels must have the logits' leading shape \(B,\) = \(4,\)"),
    (dict(labels=torch.zeros(4, dtype=torch.long, device=META)), r"labels \(meta\) must be on"),
    (dict(teacher_temperature=0.0), "teacher_temperature must be positive"),
    (dict(student_temperature=float("nan")), "student_temperature must be positive"),
    (dict(teacher_temperature=float("inf")), "teacher_temperature must be positive"),
    (dict(teacher_temperature="2"), "teacher_temperature must be a number"),
    (dict(teacher_temperature=torch.ones(4)), r"per class must have shape \(C,\) = \(5,\)"),
    (dict(labels=None, teacher_temperature=torch.ones(5)), r"needs labels; for one temperature per row pass a "
                                                           r"\(B, 1\) = \(4, 1\) tensor"),
    (dict(labels=None, student_temperature=torch.ones(4)), "student_temperature .* needs labels"),
    (dict(student_temperature=torch.ones(2, 5)), r"got shape \(2, 5\)"),
    (dict(student_temperature=torch.ones(4, 1, 1)), r"got shape \(4, 1, 1\)"),
    (dict(teacher_temperature=torch.ones(5, 1)), r"\(B, 1\) = \(4, 1\) tensor \(per row\), got shape \(5, 1\)"),
    (dict(teacher_temperature=torch.ones(5, dtype=torch.long)), "teacher_temperature must be a floating-point"),
    (dict(teacher_temperature=torch.ones(5, requires_grad=True)), "teacher_temperature must not require grad"),
    (dict(teacher_temperature=torch.ones(5, device=META)), r"teacher_temperature \(meta\) must be on"),
    (dict(teacher_temperature=torch.ones((), device=META)), r"teacher_temperature \(meta\) must be on"),
    (dict(weight=torch.ones(4)), r"weight must have shape \(C,\) = \(5,\)"),
    (dict(weight=torch.ones(5, 1)), r"weight must have shape \(C,\)"),
    (dict(weight=torch.ones(5, dtype=torch.int32)), "weight must be a floating-point"),
    (dict(weight=torch.ones(5, dtype=torch.complex64)), "weight must be a floating-point"),
    (dict(weight=torch.ones(5, requires_grad=True)), "weight must not require grad"),
    (dict(weight=torch.ones(5, device=META)), r"weight \(meta\) must be on"),
    (dict(weight=[1.0] * 5), "weight must be None or a"),
    (dict(labels=None, weight=torch.ones(5)), "weight is per class and needs labels"),
    (dict(sample_weight=-1.0), "sample_weight must be non-negative and finite"),
    (dict(sample_weight=float("nan")), "sample_weight must be non-negative and finite"),
    (dict(sample_weight="1"), "sample_weight must be a number"),
    (dict(sample_weight=torch.ones(5)), r"sample_weight must be a number or a tensor of the logits' leading shape "
                                        r"\(B,\) = \(4,\)"),
    (dict(sample_weight=torch.ones(4, 1)), r"sample_weight must be .* leading shape \(B,\) = \(4,\), "
                                           r"got shape \(4, 1\)"),
    (dict(sample_weight=torch.ones(4, dtype=torch.long)), "sample_weight must be a floating-point"),
    (dict(sample_weight=torch.ones(4, requires_grad=True)), "sample_weight must not require grad"),
    (dict(sample_weight=torch.ones(4, device=META)), r"sample_weight \(meta\) must be on"),
    (dict(reduction="avg"), "reduction"),
    (dict(ignore_index=1.5), "ignore_index"),
    (dict(s_dtype=torch.int64), "fp32, fp16, bf16"),
]


@pytest.mark.parametrize("case,message", BAD_CALLS, ids=[m for _, m in BAD_CALLS])
def test_bad_arguments_raise_value_error(case, message, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the arguments were checked")

    monkeypatch.setattr(torch.ops.fastabsld, "kd_kl_div_forward", no_kernel, raising=False)
    monkeypatch.setattr(torch.ops.fastabsld, "kd_kl_div_loss", no_kernel, raising=False)
    case = dict(case)
    s = torch.randn(case.pop("s", (4, 5))).to(case.pop("s_dtype", torch.float32))
    t = torch.randn(case.pop("t", (4, 5)))
    kwargs = dict(labels=torch.tensor([0, 1, 2, 3]))
    kwargs.update(case)
    with pytest.raises(ValueError, match=message):
        kd_kl_div(s, t, **kwargs)


@pytest.mark.parametrize("batch", [4, 8000], ids=["serial", "parallel_rows"])  # grain: 16384 / C rows
@pytest.mark.parametrize("bad", ["label", "temperature", "row_temperature", "weight", "unused_weight",
                                 "sample_weight"])
def test_bad_values_in_tensors_raise(path, bad, batch):
    s, t, labels = make(batch, 5)
    labels[batch // 2] = 9 if bad == "label" else 2
    labels[labels == 4] = 3
    tau = torch.tensor([1.0, 1.0, -2.0, 1.0, 1.0]) if bad == "temperature" else torch.ones(5)
    if bad == "row_temperature":
        tau = torch.ones(batch, 1)
        tau[batch // 2] = float("nan")
    weight = torch.ones(5)
    sample_weight = torch.ones(batch)
    if bad == "weight":
        weight[2] = float("inf")
    elif bad == "unused_weight":
        weight[4] = -1.0  # no row is labelled 4
    elif bad == "sample_weight":
        sample_weight[batch // 2] = -0.5
    error, message = (ValueError, "weight") if "weight" in bad else (RuntimeError, "labels|temperature")
    with pytest.raises(error, match=message):
        kd_kl_div(s, t, labels=labels, teacher_temperature=tau, weight=weight, sample_weight=sample_weight)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighting", ["unweighted", "class", "sample", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_row_ignored_gives_zero_loss_and_zero_gradients(path, reduction, weighting, dtype):
    """A padding-only micro-batch adds nothing: loss 0 (zeros for "none"), gradients 0, no NaN."""
    s, t, _ = make(4, 3, dtype)
    labels = torch.full((4,), -100)
    weight, sample_weight = weights_of(weighting, 4, 3)
    kwargs = dict(labels=labels, reduction=reduction, weight=weight, sample_weight=sample_weight,
                  teacher_temperature=torch.tensor([0.5, 1.0, 2.0]))
    got = loss_and_grads(kd_kl_div, s, t, lambda out: torch.ones_like(out), **kwargs)
    want = loss_and_grads(reference_fn(**{k: v for k, v in kwargs.items() if k != "reduction"}), s, t,
                          lambda out: torch.ones_like(out), reduction=reduction)
    for g, w in zip(got, want):
        assert torch.equal(g.double(), torch.zeros_like(g).double())
        torch.testing.assert_close(g.double(), w.double())


def test_padding_micro_batch_leaves_accumulated_gradient_unchanged(path):
    """Gradient accumulation over a real micro-batch and a padding-only one: the real one's gradient."""
    s, t, labels = make(6, 4)
    s.requires_grad_(True)
    kd_kl_div(s[:3], t[:3], labels=labels[:3]).backward()
    first = s.grad.clone()
    kd_kl_div(s[3:], t[3:], labels=torch.full((3,), -100)).backward()
    assert torch.equal(s.grad[:3], first[:3]) and torch.equal(s.grad[3:], torch.zeros(3, 4))


@pytest.mark.parametrize("dynamic", [True, None])
def test_compile_dynamic_fullgraph(dynamic):
    """torch.compile(dynamic=True, fullgraph=True) traces the argument checks (numbers included)."""
    torch._dynamo.reset()

    def loss(student, teacher, labels, tau):
        return (kd_kl_div(student, teacher, labels=labels, teacher_temperature=tau)
                + kd_kl_div(student, teacher, student_temperature=2.0, sample_weight=0.5, reduction="mean"))

    compiled = torch.compile(loss, dynamic=dynamic, fullgraph=True, backend="aot_eager")
    for batch in (5, 7):
        s, t, labels = make(batch, 4)
        labels[0] = -100
        tau = torch.tensor([0.5, 1.0, 2.0, 4.0])
        got = loss_and_grads(lambda a, b: compiled(a, b, labels, tau), s, t, lambda out: torch.ones_like(out))
        want = loss_and_grads(lambda a, b: loss(a, b, labels, tau), s, t, lambda out: torch.ones_like(out))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", ["teacher_temperature", "student_temperature"])
@pytest.mark.parametrize("value,message", [(1e-300, "underflows fp32 to 0"), (1e39, "overflows fp32"),
                                           (2e-46, "underflows fp32 to 0")])
def test_number_temperature_outside_fp32_names_the_problem(name, value, message):
    s, t, _ = make(3, 4)
    with pytest.raises(ValueError, match=f"{name} = .* {message}"):
        kd_kl_div(s, t, **{name: value})
    for dtype in (torch.float16, torch.bfloat16):  # computed in fp32 as well
        with pytest.raises(ValueError, match=message):
            kd_kl_div(s.to(dtype), t.to(dtype), **{name: value})
    torch.testing.assert_close(  # fp64 logits hold it
        kd_kl_div(s.double(), t.double(), **{name: value}),
        reference.kd_kl_div(s.double(), t.double(), **{name: value}))


def test_sample_weight_number_outside_fp32_names_the_problem():
    s, t, _ = make(3, 4)
    with pytest.raises(ValueError, match="sample_weight = .* overflows fp32"):
        kd_kl_div(s, t, sample_weight=1e39)


def nd_case(lead, num_classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(*lead, num_classes, generator=gen)
    t = 3 * torch.randn(*lead, num_classes, generator=gen)
    labels = torch.randint(0, num_classes, lead, generator=gen)
    labels.view(-1)[1] = -100
    return s, t, labels


@pytest.mark.parametrize("lead", [(2, 3), (2, 1, 3), (1, 4), (0, 3)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["number", "per_class", "per_row", "weights"])
def test_leading_dimensions_are_rows(path, lead, reduction, kind):
    """(..., C) logits give the (N, C) flattened call's loss (the leading shape for "none") and gradients."""
    s, t, labels = nd_case(lead) if math.prod(lead) > 1 else (None, None, None)
    if s is None:
        gen = torch.Generator().manual_seed(1)
        s, t = (torch.randn(*lead, 5, generator=gen) for _ in range(2))
        labels = torch.randint(0, 5, lead, generator=gen)
    rows = math.prod(lead)
    gen = torch.Generator().manual_seed(2)
    nd, flat = {}, {}
    if kind == "per_class":
        nd["teacher_temperature"] = flat["teacher_temperature"] = 0.5 + torch.rand(5, generator=gen)
    elif kind == "per_row":
        tau = 0.5 + torch.rand(*lead, 1, generator=gen)
        nd["student_temperature"], flat["student_temperature"] = tau, tau.reshape(rows, 1)
    elif kind == "weights":
        sample = torch.rand(*lead, generator=gen)
        nd["sample_weight"], flat["sample_weight"] = sample, sample.reshape(rows)
        nd["weight"] = flat["weight"] = torch.rand(5, generator=gen)
    else:
        nd["teacher_temperature"] = flat["teacher_temperature"] = 2.0

    def flattened(a, b, **kwargs):
        out = kd_kl_div(a.reshape(rows, 5), b.reshape(rows, 5), labels=labels.reshape(rows), **flat, **kwargs)
        return out.reshape(lead) if kwargs["reduction"] == "none" else out

    got = loss_and_grads(lambda a, b, **kw: kd_kl_div(a, b, labels=labels, **nd, **kw), s, t,
                         lambda out: torch.full_like(out, 1.5), reduction=reduction)
    want = loss_and_grads(flattened, s, t, lambda out: torch.full_like(out, 1.5), reduction=reduction)
    assert got[0].shape == (lead if reduction == "none" else ())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    want_ref = reference.kd_kl_div(s.reshape(rows, 5), t.reshape(rows, 5), labels.reshape(rows),
                                   flat.get("teacher_temperature", 1.0), flat.get("student_temperature", 1.0),
                                   reduction=reduction, weight=flat.get("weight"),
                                   sample_weight=flat.get("sample_weight"))
    torch.testing.assert_close(got[0], want_ref.reshape(got[0].shape))


def test_leading_dimensions_batchmean_counts_every_row_unlike_f_kl_div():
    """For (B, T, C), "batchmean" divides by B * T counted rows; F.kl_div's by B."""
    s, t, _ = nd_case((2, 3))
    ours = kd_kl_div(s, t)
    theirs = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), reduction="batchmean",
                                        log_target=True)
    torch.testing.assert_close(ours * 3, theirs)


def test_kdloss_takes_leading_dimensions(path):
    s, t, labels = nd_case((2, 3))
    tau = torch.rand(2, 3, 1, generator=torch.Generator().manual_seed(3)) + 0.5
    sample_weight = torch.rand(2, 3, generator=torch.Generator().manual_seed(4))
    got = KDLoss(teacher_temperature=tau, reduction="none")(s, t, labels, sample_weight=sample_weight)
    want = reference.kd_kl_div(s.reshape(6, 5), t.reshape(6, 5), labels.reshape(6), tau.reshape(6, 1),
                               reduction="none", sample_weight=sample_weight.reshape(6))
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want.reshape(2, 3))


@pytest.mark.parametrize("kwargs,message", [
    (dict(labels=torch.zeros(6, dtype=torch.long)), r"labels must have the logits' leading shape \(\.\.\.\) = "
                                                    r"\(2, 3\), got shape \(6,\)"),
    (dict(student_temperature=torch.ones(6, 1)), r"\(\.\.\., 1\) = \(2, 3, 1\) tensor \(per row\), got shape \(6, 1\)"),
    (dict(sample_weight=torch.ones(6)), r"sample_weight must be a number or a tensor of the logits' leading shape "
                                        r"\(\.\.\.\) = \(2, 3\)"),
])
def test_leading_dimensions_shape_errors(kwargs, message):
    s, t, _ = nd_case((2, 3))
    with pytest.raises(ValueError, match=message):
        kd_kl_div(s, t, **kwargs)
