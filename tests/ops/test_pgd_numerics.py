"""Numerical soundness of torch.ops.fastabsld.pgd_step against torchattacks' formulas in fp64.

The oracle is written out here, independent of fastabsld: torchattacks' PGD and PGDL2 updates,
evaluated in fp64 on the op's (dtype-rounded) inputs, with the norms scaled by the largest
element so that huge gradients do not overflow. Tolerances come from the unit roundoff of the
dtype the op computes in (fp64 for fp64 inputs, fp32 otherwise):

- value: per sample, ||out - oracle||_2 <= K * u * ||m||_2 with m_i = |x_adv_i| + |x_i| +
  |alpha * g_i / (||g|| + 1e-10)| + |out_i|, the magnitudes that the roundings scale with.
  The projection factor adds at most twice the rounding of delta (its direction error), so
  K = 16 leaves room without hiding an error of a few hundred ulps.
- ball: the output is within one ulp per element (of the output dtype) of a point of the eps
  ball: ||out - x|| <= eps * (1 + 4u) + ||ulp(out)||_2 (L2), |out - x| <= eps * (1 + u) + ulp(out)
  (L-inf); and always inside the box.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastabsld import HAS_EXTENSION, reference
from fastabsld.ops import pgd as pgd_op
from fastabsld.ops import pgd_step

K_VALUE = 16


def compute_roundoff(dtype):
    """Unit roundoff of the dtype the op computes in for inputs of ``dtype``."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def _mantissa_bits(dtype):
    return {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]


def spacing(t):
    """Spacing (one ulp) of ``t``'s dtype at each element of ``t``, as fp64."""
    finfo = torch.finfo(t.dtype)
    a = torch.clamp(t.double().abs(), min=finfo.tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - _mantissa_bits(t.dtype))


def robust_norm(v):
    """Row norms of the (B, n) fp64 ``v`` without overflow: max|v| * ||v / max|v|||."""
    m = v.abs().amax(dim=1, keepdim=True)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return (m * (v / safe).norm(dim=1, keepdim=True)).squeeze(1), m.squeeze(1)


def per_sample_column(value, batch):
    if isinstance(value, torch.Tensor):
        return value.double().reshape(batch, 1)
    return torch.full((batch, 1), float(value), dtype=torch.float64)


def torchattacks_linf(x_adv, x, grad, alpha, eps, clamp):
    """torchattacks.PGD's update in fp64: x_adv + alpha sign(g), delta clamped to eps, box."""
    batch = x_adv.shape[0]
    xa, x0, g = (t.double().reshape(batch, -1) for t in (x_adv, x, grad))
    a, e = per_sample_column(alpha, batch), per_sample_column(eps, batch)
    stepped = xa + a * torch.sign(g)
    delta = torch.maximum(torch.minimum(stepped - x0, e), -e)
    return torch.clamp(x0 + delta, *clamp).reshape(x_adv.shape)


def torchattacks_l2(x_adv, x, grad, alpha, eps, clamp):
    """torchattacks.PGDL2's update in fp64.

    grad / (||grad|| + 1e-10) is evaluated as (g / m) / (||g / m|| + 1e-10 / m), m = max|g|,
    the same value without overflow; delta *= min(1, eps / ||delta||), 1 where delta = 0.

    Returns:
        (output, alpha * unit gradient): both (B, ...) fp64.
    """
    batch = x_adv.shape[0]
    xa, x0, g = (t.double().reshape(batch, -1) for t in (x_adv, x, grad))
    a, e = per_sample_column(alpha, batch), per_sample_column(eps, batch)
    m = g.abs().amax(dim=1, keepdim=True)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    scaled = g / safe
    unit = scaled / (scaled.norm(dim=1, keepdim=True) + 1e-10 / safe)
    step = a * unit
    delta = (xa + step) - x0
    d_norm, _ = robust_norm(delta)
    d_norm = d_norm.reshape(batch, 1)
    factor = torch.where(d_norm > 0, e / torch.where(d_norm > 0, d_norm, torch.ones_like(d_norm)),
                         torch.ones_like(d_norm)).clamp(max=1.0)
    out = torch.clamp(x0 + delta * factor, *clamp)
    return out.reshape(x_adv.shape), step.reshape(x_adv.shape)


def assert_sound(out, x_adv, x, grad, alpha, eps, norm, clamp=(0.0, 1.0)):
    """Checks out against the oracle, the eps ball and the box, with the module's tolerances."""
    batch = x_adv.shape[0]
    u = compute_roundoff(x_adv.dtype)
    assert out.dtype == x_adv.dtype and out.shape == x_adv.shape
    o = out.double().reshape(batch, -1)
    x0 = x.double().reshape(batch, -1)
    e = per_sample_column(eps, batch).squeeze(1)
    assert bool((o >= clamp[0]).all()) and bool((o <= clamp[1]).all()), "outside the box"
    one_ulp = spacing(out).reshape(batch, -1)
    if norm == "linf":
        expected = torchattacks_linf(x_adv, x, grad, alpha, eps, clamp).reshape(batch, -1)
        magnitude = (x_adv.double().reshape(batch, -1).abs() + x0.abs() + per_sample_column(alpha, batch)
                     + o.abs())
        err = (o - expected).abs()
        assert bool((err <= 4 * u * magnitude + one_ulp).all()), f"max error {err.max().item():.3e}"
        assert bool(((o - x0).abs() <= (e * (1 + u)).unsqueeze(1) + one_ulp).all()), "outside the eps box"
        return
    expected, step = torchattacks_l2(x_adv, x, grad, alpha, eps, clamp)
    expected = expected.reshape(batch, -1)
    magnitude = x_adv.double().abs() + x.double().abs() + step.abs()
    magnitude = magnitude.reshape(batch, -1) + o.abs()
    err = (o - expected).norm(dim=1)
    # Output rounding to fp16/bf16 is one ulp of the output per element on top.
    bound = K_VALUE * u * magnitude.norm(dim=1) + one_ulp.norm(dim=1)
    assert bool((err <= bound).all()), f"error {err.tolist()} > bound {bound.tolist()}"
    dist = (o - x0).norm(dim=1)
    ball = e * (1 + 4 * u) + one_ulp.norm(dim=1)
    assert bool((dist <= ball).all()), f"distance {dist.tolist()} > eps ball {ball.tolist()}"


def make_case(case, dtype, batch, features, spread, ratio, scale_exponent, seed):
    """Inputs (x_adv, x, grad, alpha) of a given kind, generated in fp64 and rounded to ``dtype``.

    case: "random"; "cancelling": grad ~ -(x_adv - x) and alpha ~ (1 - ratio) ||x_adv - x||, so
    that the step nearly undoes x_adv - x (||delta|| ~ ratio ||d0||); "huge" / "tiny": grad
    scaled by 10^scale_exponent.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, features)
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    x_adv = (x + spread * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    x, x_adv = x.to(dtype), x_adv.to(dtype)
    alpha = None
    if case == "cancelling":
        d0 = x_adv.double() - x.double()
        grad = -d0 * (1 + 1e-3 * torch.randn(shape, generator=gen, dtype=torch.float64))
        alpha = (1 - ratio) * d0.norm(dim=1)
    elif case in ("huge", "tiny"):
        grad = grad * 10.0**scale_exponent
    grad = grad.to(dtype)
    return x_adv, x, grad, alpha


IMPLS = ["op", "fallback"]


def step(impl, x_adv, x, grad, *, alpha, eps, norm):
    """One step through the op (the compiled kernels) or the plain PyTorch fallback kernel."""
    if impl == "op":
        return pgd_step(x_adv, x, grad, alpha=alpha, eps=eps, norm=norm)
    alpha_t, alpha_f, eps_t, eps_f, lo, hi = pgd_op.check_step_arguments(alpha, eps, (0.0, 1.0), x_adv.shape[0],
                                                                         x_adv.device)
    return pgd_op.fallback_step(x_adv, x, grad, alpha_t, eps_t, alpha_f, eps_f, norm, lo, hi)


CASE_SETTINGS = settings(max_examples=60, deadline=None)


@pytest.mark.parametrize("impl", IMPLS)
@CASE_SETTINGS
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    case=st.sampled_from(["random", "cancelling", "huge", "tiny"]),
    batch=st.integers(1, 5),
    features=st.integers(1, 700),
    spread=st.floats(0.001, 0.5),
    ratio=st.floats(1e-7, 1e-2),
    alpha=st.floats(0.0, 2.0),
    eps_fraction=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_l2_step_matches_torchattacks_in_fp64(impl, dtype, case, batch, features, spread, ratio, alpha, eps_fraction,
                                              seed, data):
    top = 37 if dtype == torch.float32 else 300
    bottom = -44 if dtype == torch.float32 else -300
    exponent = data.draw(st.integers(19, top) if case == "huge" else st.integers(bottom, -10))
    x_adv, x, grad, alpha_t = make_case(case, dtype, batch, features, spread, ratio, exponent, seed)
    if alpha_t is not None:
        # The step nearly undoes d0; eps on either side of ||delta|| ~ ratio ||d0||.
        alpha_arg = alpha_t.to(dtype)
        eps_arg = (eps_fraction * ratio * alpha_t).clamp(min=0).to(dtype)
    else:
        alpha_arg, eps_arg = alpha, eps_fraction
    out = step(impl, x_adv, x, grad, alpha=alpha_arg, eps=eps_arg, norm="l2")
    assert_sound(out, x_adv, x, grad, alpha_arg, eps_arg, "l2")


@pytest.mark.parametrize("impl", IMPLS)
@CASE_SETTINGS
@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    norm=st.sampled_from(["linf", "l2"]),
    batch=st.integers(1, 5),
    features=st.integers(1, 700),
    spread=st.floats(0.0, 1.0),
    alpha=st.floats(0.0, 1.0),
    eps=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_step_stays_in_the_ball_and_the_box(impl, dtype, norm, batch, features, spread, alpha, eps, seed):
    x_adv, x, grad, _ = make_case("random", dtype, batch, features, spread, 0.0, 0, seed)
    out = step(impl, x_adv, x, grad, alpha=alpha, eps=eps, norm=norm)
    assert_sound(out, x_adv, x, grad, alpha, eps, norm)


def cancelling_inputs(dtype, relative=1e-4, batch=4, features=3072):
    """A step that undoes x_adv - x up to ``relative``: ||delta|| = relative * ||d0|| exactly in fp64."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(batch, features, generator=gen, dtype=torch.float64).to(dtype)
    x_adv = (x.double() + 0.03 * torch.randn(batch, features, generator=gen, dtype=torch.float64)).clamp(0, 1)
    x_adv = x_adv.to(dtype)
    d0 = x_adv.double() - x.double()
    grad = (-d0).to(dtype)
    alpha = ((1 - relative) * grad.double().norm(dim=1)).to(dtype)
    return x_adv, x, grad, alpha


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.5, 1e-4, 1e-5])
def test_l2_step_that_nearly_undoes_the_perturbation(device, dtype, eps, impl):
    """||delta|| = 1e-4 ||d0||: the expanded ||delta||^2 cancelled to a wrong projection."""
    x_adv, x, grad, alpha = (t.to(device) for t in cancelling_inputs(dtype))
    out = step(impl, x_adv, x, grad, alpha=alpha, eps=eps, norm="l2").cpu()
    x_adv, x, grad, alpha = (t.cpu() for t in (x_adv, x, grad, alpha))
    assert_sound(out, x_adv, x, grad, alpha, eps, "l2")
    expected, _ = torchattacks_l2(x_adv, x, grad, alpha, eps, (0.0, 1.0))
    dist = (out.double() - x.double()).norm(dim=1)
    want = (expected - x.double()).norm(dim=1)
    # The output's own rounding (half an ulp per element) bounds how well its distance can match.
    rounding = 0.5 * spacing(out).reshape(out.shape[0], -1).norm(dim=1).max().item()
    torch.testing.assert_close(dist, want, rtol=K_VALUE * compute_roundoff(dtype), atol=rounding)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fp64_computes_in_fp64(device, norm, impl):
    """An fp64 step matches the fp64 oracle to fp64 rounding (fp32 compute errs by ~1e-8)."""
    x_adv, x, grad, _ = make_case("random", torch.float64, 4, 3 * 17 * 17, 0.05, 0.0, 0, 11)
    alpha, eps = (2 / 255, 8 / 255) if norm == "linf" else (0.1, 0.3)
    out = step(impl, x_adv.to(device), x.to(device), grad.to(device), alpha=alpha, eps=eps, norm=norm).cpu()
    assert_sound(out, x_adv, x, grad, alpha, eps, norm)
    expected = (torchattacks_linf(x_adv, x, grad, alpha, eps, (0.0, 1.0)) if norm == "linf"
                else torchattacks_l2(x_adv, x, grad, alpha, eps, (0.0, 1.0))[0])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1e25), (torch.float32, 3e37),
                                              (torch.float64, 1e25), (torch.float64, 1e300)])
@pytest.mark.parametrize("impl", IMPLS)
def test_l2_step_with_a_huge_gradient_takes_the_step(device, dtype, magnitude, impl):
    """||grad||^2 overflows: the step is still alpha in the gradient's direction."""
    gen = torch.Generator().manual_seed(5)
    x = torch.full((3, 500), 0.5, dtype=dtype)
    direction = torch.randn(3, 500, generator=gen, dtype=torch.float64)
    grad = (direction / direction.abs().amax() * magnitude).to(dtype)
    out = step(impl, x.to(device), x.to(device), grad.to(device), alpha=0.1, eps=1.0, norm="l2").cpu()
    moved = (out.double() - x.double()).norm(dim=1)
    torch.testing.assert_close(moved, torch.full((3,), 0.1, dtype=torch.float64),
                               rtol=8 * compute_roundoff(dtype) * 500**0.5, atol=0)
    assert_sound(out, x, x, grad, 0.1, 1.0, "l2")


# ---- memory safety: devices, and the empty batch --------------------------------------------

def raw_step(x_adv, x, grad, alpha_t=None, eps_t=None, norm="linf"):
    return torch.ops.fastabsld.pgd_step(x_adv, x, grad, alpha_t, eps_t, 0.01, 0.03, norm, 0.0, 1.0)


@pytest.mark.skipif(not HAS_EXTENSION, reason="the device checks are in fastabsld._C")
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("argument", ["x", "grad", "alpha_per_sample", "eps_per_sample"])
@pytest.mark.parametrize("inference", [False, True])
def test_an_argument_on_another_device_is_an_error(norm, argument, inference):
    """A meta tensor among CPU ones used to select the meta kernel: uninitialised memory out."""
    cpu = torch.rand(3, 4)
    args = {"x_adv": cpu, "x": cpu.clone(), "grad": torch.randn(3, 4), "alpha_t": None, "eps_t": None}
    key = {"alpha_per_sample": "alpha_t", "eps_per_sample": "eps_t"}.get(argument, argument)
    args[key] = torch.empty(3, 4, device="meta") if key in ("x", "grad") else torch.empty(3, device="meta")
    with torch.inference_mode(inference), pytest.raises(RuntimeError, match=f"{argument} is on meta"):
        raw_step(**args, norm=norm)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("argument", ["x", "grad", "alpha", "eps"])
def test_the_public_function_reports_a_device_mismatch(argument, norm):
    """At the public boundary a ValueError names the argument (the kernels' own check is tested above)."""
    x = torch.rand(2, 5)
    args = {"x": x.clone(), "grad": torch.randn(2, 5), "alpha": 0.1, "eps": 0.2}
    args[argument] = torch.empty(2, 5, device="meta") if argument in ("x", "grad") else torch.empty(2, device="meta")
    with pytest.raises(ValueError, match=f"{argument} is on meta"):
        pgd_step(x, args["x"], args["grad"], alpha=args["alpha"], eps=args["eps"], norm=norm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_cuda_and_cpu_arguments_do_not_mix():
    x = torch.rand(2, 5, device="cuda")
    with pytest.raises(RuntimeError, match="grad is on cpu"):
        raw_step(x, x, torch.rand(2, 5))
    with pytest.raises(RuntimeError, match="alpha_per_sample is on cpu"):
        raw_step(x, x, x, alpha_t=torch.rand(2))
    with pytest.raises(RuntimeError, match="x is on cuda"):
        raw_step(x.cpu(), x, x.cpu())
    # A 0-d tensor radius is a number: it follows x_adv to its device.
    out = pgd_step(x, x, x, alpha=torch.tensor(0.1), eps=torch.tensor(0.2))
    assert out.device == x.device


def test_all_meta_arguments_give_a_meta_result():
    x = torch.empty(2, 3, 4, device="meta")
    out = raw_step(x, x, x, norm="l2")
    assert out.device.type == "meta" and out.shape == x.shape


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", [(0,), (0, 3, 4, 4), (0, 7)])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("impl", ["op", "reference", "fallback"])
def test_an_empty_batch_gives_an_empty_result(device, norm, shape, per_sample, impl):
    x = torch.rand(shape, device=device)
    radius = torch.zeros(0, device=device) if per_sample else 0.1
    if impl == "op":
        out = pgd_step(x, x, x, alpha=radius, eps=radius, norm=norm)
    elif impl == "reference":
        out = reference.pgd_step(x, x, x, radius, radius, norm)
    else:  # the kernel registered when fastabsld._C is missing
        t = radius if per_sample else None
        out = pgd_op.fallback_step(x, x, x, t, t, 0.1, 0.1, norm, 0.0, 1.0)
    assert out.shape == shape and out.dtype == x.dtype and out.device == x.device


# ---- layouts and kernel paths ---------------------------------------------------------------

@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
# Per sample: tiny; pack-misaligned sample starts (7); one block (3072); several blocks (17001).
@pytest.mark.parametrize("shape", [(3, 1), (5, 7), (4, 3072), (2, 17001)])
@pytest.mark.parametrize("offset", [0, 1])
def test_views_and_sizes_take_every_kernel_path(device, norm, dtype, shape, offset):
    """Offset views start off the 16-byte boundary (one-by-one loads); sizes pick the L2 paths."""
    gen = torch.Generator().manual_seed(7)
    batch, n = shape
    base = [torch.rand(batch * n + offset, generator=gen, dtype=torch.float64) for _ in range(3)]
    x, x_adv, grad = (b[offset:].reshape(batch, n).to(dtype) for b in base)
    x_adv = x_adv.to(device) if offset == 0 else base[1].to(dtype).to(device)[offset:].reshape(batch, n)
    x, grad = x.to(device), (grad - 0.5).to(device)
    alpha, eps = (0.02, 0.05) if norm == "linf" else (0.3, 0.4)
    eps_t = torch.linspace(0.5 * eps, 1.5 * eps, batch, device=device)
    for e in (eps, eps_t):
        out = pgd_step(x_adv, x, grad, alpha=alpha, eps=e, norm=norm)
        assert_sound(out.cpu(), x_adv.cpu(), x.cpu(), grad.cpu(), alpha, e.cpu() if torch.is_tensor(e) else e, norm)
        assert torch.equal(out, pgd_step(x_adv, x, grad, alpha=alpha, eps=e, norm=norm)), "not deterministic"


@pytest.mark.parametrize("per_sample", [False, True])
# 429 elements a sample: the CPU L2 loop pipelines consecutive samples, and leaves vector and
# scalar tails; 50700: above its pipelining limit, the passes run one after the other.
@pytest.mark.parametrize("shape", [(200, 3, 11, 13), (3, 3, 130, 130)])
@pytest.mark.parametrize("threads", [1, 2])
def test_l2_sample_does_not_depend_on_its_neighbours(shape, per_sample, threads):
    """A sample stepped alone equals it stepped within the batch, whatever the thread split."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(shape, generator=gen)
    x_adv = (x + 0.05 * torch.randn(shape, generator=gen)).clamp(0, 1)
    grad = torch.randn(shape, generator=gen)
    eps = torch.linspace(0.2, 2.0, shape[0]) if per_sample else 0.5
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = pgd_step(x_adv, x, grad, alpha=0.3, eps=eps, norm="l2")
    finally:
        torch.set_num_threads(previous)
    for k in range(shape[0]):
        eps_k = eps[k:k + 1] if per_sample else eps
        alone = pgd_step(x_adv[k:k + 1], x[k:k + 1], grad[k:k + 1], alpha=0.3, eps=eps_k, norm="l2")
        assert torch.equal(out[k:k + 1], alone), f"sample {k}"
