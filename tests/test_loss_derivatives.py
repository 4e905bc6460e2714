"""Derivatives of kd_kl_div beyond the first backward, against the composite reference.

Second and higher orders in reverse mode (gradgradcheck, hessian, a gradient penalty through a
Linear layer), forward mode (torch.autograd.forward_ad, torch.func.jvp / jacfwd) and torch.func
transforms (grad, jacrev, vmap), on both paths (the eager C++ loss op and the compile-visible op),
for every temperature kind, weighting and reduction. The raw op's own reverse mode is tested too.
"""

import pytest
import torch
from torch.autograd import forward_ad

from fastabsld import reference
from fastabsld.loss import KDLoss, kd_kl_div
from fastabsld.ops.kd_loss import REDUCTIONS, kd_kl_div_forward
from tests.test_loss import path, temperature_of, weights_of  # noqa: F401  (path is a fixture)

TEMPERATURES = ["number", "0d", "per_class", "per_row"]
WEIGHTINGS = ["unweighted", "class", "sample", "both"]
BATCH, CLASSES = 4, 3


def inputs(seed=0, batch=BATCH, num_classes=CLASSES):
    """fp64 logits and labels with one ignored row."""
    gen = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(batch, num_classes, generator=gen, dtype=torch.float64)
    t = 2 * torch.randn(batch, num_classes, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    labels[1] = -100
    return s, t, labels


def case_kwargs(temperature, weighting, reduction, batch=BATCH, num_classes=CLASSES):
    """The keyword arguments of one case, every tensor fp64."""
    def fp64(x):
        return x.double() if isinstance(x, torch.Tensor) else x

    weight, sample_weight = weights_of(weighting, batch, num_classes)
    return dict(teacher_temperature=fp64(temperature_of(temperature, batch, num_classes)),
                student_temperature=fp64(temperature_of(temperature, batch, num_classes)) if temperature != "number"
                else 0.7, reduction=reduction, weight=fp64(weight), sample_weight=fp64(sample_weight))


def fused(labels, kwargs):
    return lambda s, t: kd_kl_div(s, t, labels=labels, **kwargs)


def composite(labels, kwargs):
    kwargs = dict(kwargs)
    tau_t, tau_s = kwargs.pop("teacher_temperature"), kwargs.pop("student_temperature")
    return lambda s, t: reference.kd_kl_div(s, t, labels, tau_t, tau_s, **kwargs)


def scalar(fn):
    """A function's output summed with fixed coefficients (a 0-d output for "none" too)."""
    def out(*args):
        value = fn(*args)
        return value if value.dim() == 0 else (value * torch.arange(1, value.numel() + 1, dtype=value.dtype)).sum()
    return out


# Every temperature kind with every reduction (weighted both ways), and every weighting.
CASES = [(tau, "both", r) for tau in TEMPERATURES for r in REDUCTIONS] + \
    [("per_class", w, "batchmean") for w in WEIGHTINGS if w != "both"]
IDS = ["-".join(c) for c in CASES]


@pytest.mark.parametrize("temperature,weighting,reduction", CASES, ids=IDS)
def test_gradgradcheck(path, temperature, weighting, reduction):
    s, t, labels = inputs()
    loss = fused(labels, case_kwargs(temperature, weighting, reduction))
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradgradcheck(loss, (s, t), fast_mode=True)


@pytest.mark.parametrize("temperature,weighting,reduction", CASES, ids=IDS)
def test_hessian_matches_composite(path, temperature, weighting, reduction):
    s, t, labels = inputs(1)
    kwargs = case_kwargs(temperature, weighting, reduction)
    got = torch.autograd.functional.hessian(scalar(fused(labels, kwargs)), (s, t))
    want = torch.autograd.functional.hessian(scalar(composite(labels, kwargs)), (s, t))
    for g_row, w_row in zip(got, want):
        for g, w in zip(g_row, w_row):
            torch.testing.assert_close(g, w)
    assert want[0][0].abs().max() > 1e-3  # the comparison is not between zeros


@pytest.mark.parametrize("temperature,weighting,reduction", CASES, ids=IDS)
def test_forward_mode_matches_composite(path, temperature, weighting, reduction):
    s, t, labels = inputs(2)
    kwargs = case_kwargs(temperature, weighting, reduction)
    gen = torch.Generator().manual_seed(3)
    ds, dt = (torch.randn(s.shape, generator=gen, dtype=s.dtype) for _ in range(2))
    got = torch.func.jvp(fused(labels, kwargs), (s, t), (ds, dt))
    want = torch.func.jvp(composite(labels, kwargs), (s, t), (ds, dt))
    torch.testing.assert_close(got, want)
    assert want[1].abs().max() > 1e-3
    for argnums in (0, 1):
        torch.testing.assert_close(torch.func.jacfwd(fused(labels, kwargs), argnums=argnums)(s, t),
                                   torch.func.jacfwd(composite(labels, kwargs), argnums=argnums)(s, t))
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(fused(labels, kwargs)(forward_ad.make_dual(s, ds), t)).tangent
    torch.testing.assert_close(tangent, torch.func.jvp(composite(labels, kwargs), (s, t), (ds, torch.zeros_like(t)))[1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_torch_func_transforms_match_composite(path, temperature, reduction):
    s, t, labels = inputs(4)
    kwargs = case_kwargs(temperature, "both", reduction)
    for argnums in (0, 1, (0, 1)):
        torch.testing.assert_close(torch.func.grad(scalar(fused(labels, kwargs)), argnums=argnums)(s, t),
                                   torch.func.grad(scalar(composite(labels, kwargs)), argnums=argnums)(s, t))
    torch.testing.assert_close(torch.func.jacrev(fused(labels, kwargs))(s, t),
                               torch.func.jacrev(composite(labels, kwargs))(s, t))
    torch.testing.assert_close(torch.func.hessian(scalar(fused(labels, kwargs)))(s, t),
                               torch.func.hessian(scalar(composite(labels, kwargs)))(s, t))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vmap_over_batches_of_logits(path, reduction):
    """vmap over a leading dimension of logits and labels matches a loop of calls."""
    gen = torch.Generator().manual_seed(5)
    s, t = (torch.randn(3, BATCH, CLASSES, generator=gen) for _ in range(2))
    labels = torch.randint(0, CLASSES, (3, BATCH), generator=gen)
    tau = 0.5 + torch.rand(CLASSES, generator=gen)

    def loss(a, b, y):
        return kd_kl_div(a, b, labels=y, teacher_temperature=tau, reduction=reduction)

    got = torch.func.vmap(loss)(s, t, labels)
    want = torch.stack([reference.kd_kl_div(s[i], t[i], labels[i], tau, reduction=reduction) for i in range(3)])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("temperature,weighting,reduction", CASES, ids=IDS)
def test_gradient_penalty_training_step_matches_composite(path, temperature, weighting, reduction):
    """``kd + 10 * |d kd / d x|^2`` through a Linear layer: the parameters' gradients as the composite's."""
    s, t, labels = inputs(6)
    kwargs = case_kwargs(temperature, weighting, reduction)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, 5, generator=gen, dtype=torch.float64)
    results = []
    for loss in (fused(labels, kwargs), composite(labels, kwargs)):
        layer = torch.nn.Linear(5, CLASSES, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(CLASSES, 5, generator=torch.Generator().manual_seed(8)))
            layer.bias.copy_(torch.randn(CLASSES, generator=torch.Generator().manual_seed(9)))
        inp = x.clone().requires_grad_(True)
        kd = scalar(loss)(layer(inp), t)
        (grad_x,) = torch.autograd.grad(kd, inp, create_graph=True)
        total = kd + 10 * (grad_x ** 2).sum()
        total.backward()
        results.append((total.detach(), layer.weight.grad, layer.bias.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_gradient_penalty_with_teacher_gradient(path):
    """Second derivatives that mix the student's and the teacher's logits (both require grad)."""
    s, t, labels = inputs(10)
    kwargs = case_kwargs("per_class", "both", "batchmean")
    results = []
    for loss in (fused(labels, kwargs), composite(labels, kwargs)):
        a, b = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        value = loss(a, b)
        grad_a, grad_b = torch.autograd.grad(value, (a, b), create_graph=True)
        ((grad_a ** 2).sum() + (grad_a * grad_b).sum()).backward()
        results.append((a.grad, b.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_third_order(path):
    s, t, labels = inputs(11)
    kwargs = case_kwargs("per_row", "sample", "sum")
    s.requires_grad_(True)
    values = []
    for loss in (fused(labels, kwargs), composite(labels, kwargs)):
        (g,) = torch.autograd.grad(loss(s, t), s, create_graph=True)
        (h,) = torch.autograd.grad((g ** 2).sum(), s, create_graph=True)
        (k,) = torch.autograd.grad((h ** 2).sum(), s)
        values.append(k)
    torch.testing.assert_close(*values)


def test_kdloss_module_has_second_derivatives(path):
    s, t, labels = inputs(12)
    module = KDLoss(teacher_temperature=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    composite_loss = composite(labels, dict(teacher_temperature=module.teacher_temperature, student_temperature=1.0))
    got = torch.autograd.functional.hessian(lambda a: module(a, t, labels), s)
    torch.testing.assert_close(got, torch.autograd.functional.hessian(lambda a: composite_loss(a, t), s))


def test_raw_op_second_derivative_matches_composite():
    """kd_kl_div_forward's row losses differentiated twice (its backward under create_graph)."""
    s, t, labels = inputs(13)
    tau = torch.tensor([0.5, 1.5, 3.0], dtype=torch.float64)
    s.requires_grad_(True)
    t.requires_grad_(True)
    rows = kd_kl_div_forward(s, t, labels, tau, None, 1.0, 0.8, -100, True, True)[0]
    want_rows = reference.kd_kl_div(s, t, labels, tau, 0.8, reduction="none")
    coefficients = torch.arange(1.0, BATCH + 1, dtype=torch.float64)
    got = torch.autograd.grad((rows * coefficients).sum(), (s, t), create_graph=True)
    want = torch.autograd.grad((want_rows * coefficients).sum(), (s, t), create_graph=True)
    got2 = torch.autograd.grad(sum((g ** 2).sum() for g in got), (s, t))
    want2 = torch.autograd.grad(sum((w ** 2).sum() for w in want), (s, t))
    torch.testing.assert_close(got2, want2)
    assert torch.autograd.gradgradcheck(
        lambda a, b: kd_kl_div_forward(a, b, labels, tau, None, 1.0, 0.8, -100, True, True)[0], (s, t))


def test_raw_op_function_forward_mode_matches_composite():
    """kd_kl_div_forward (the Python function) under torch.func.jvp: the row losses' tangent."""
    s, t, labels = inputs(14)
    tau = torch.tensor([0.5, 1.5, 3.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(15)
    ds, dt = (torch.randn(s.shape, generator=gen, dtype=s.dtype) for _ in range(2))

    def rows(a, b):
        return kd_kl_div_forward(a, b, labels, tau, None, 1.0, 0.8, -100, False, False)[0]

    got = torch.func.jvp(rows, (s, t), (ds, dt))
    want = torch.func.jvp(lambda a, b: reference.kd_kl_div(a, b, labels, tau, 0.8, reduction="none"), (s, t), (ds, dt))
    torch.testing.assert_close(got, want)
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(rows(forward_ad.make_dual(s, ds), forward_ad.make_dual(t, dt))).tangent
    torch.testing.assert_close(tangent, want[1])


@pytest.mark.parametrize("dual", ["student", "teacher"])
def test_the_raw_op_refuses_a_forward_mode_tangent(dual):
    """torch.ops.fastabsld.kd_kl_div_forward has reverse-mode autograd only: a tangent is an error, never dropped."""
    s, t, labels = inputs(16)
    with forward_ad.dual_level():
        if dual == "student":
            s = forward_ad.make_dual(s, torch.ones_like(s))
        else:
            t = forward_ad.make_dual(t, torch.ones_like(t))
        with pytest.raises(NotImplementedError, match="no forward-mode derivative.*fastabsld.loss.kd_kl_div"):
            torch.ops.fastabsld.kd_kl_div_forward(s, t, labels, None, None, 1.0, 1.0, -100, True, False)
        # The public function computes through differentiable operations there.
        assert forward_ad.unpack_dual(kd_kl_div(s, t, labels=labels)).tangent is not None
