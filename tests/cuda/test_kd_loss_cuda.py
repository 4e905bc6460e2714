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
