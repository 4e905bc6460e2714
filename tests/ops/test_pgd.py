"""fastabsld.ops.pgd_step (torch.ops.fastabsld.pgd_step) against fastabsld.reference.pgd_step."""

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastabsld import HAS_EXTENSION, reference
from fastabsld.ops import pgd_step
from tests.ops.without_extension import BLOCK_EXTENSION

RADII = {"linf": (2 / 255, 8 / 255), "l2": (0.1, 0.5)}
# L-inf follows the reference's operations exactly; L2 sums in another order, so its result may
# differ by float rounding: about one unit in the last place of the output dtype.
L2_ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=1, spread=0.03):
    """Clean inputs in [0, 1], a start near them, and a gradient with zeros and a zero sample."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen)
    x_adv = (x + spread * torch.randn(shape, generator=gen)).clamp(0, 1)
    grad = torch.randn(shape, generator=gen)
    grad.view(-1)[::5] = 0
    if shape[0] > 1:
        grad[1] = 0
    return tuple(t.to(device, dtype) for t in (x_adv, x, grad))


def per_sample(values, batch, device):
    return torch.linspace(0.5 * values, 1.5 * values, batch, device=device)


def assert_matches_reference(out, x_adv, x, grad, alpha, eps, norm, clamp=(0.0, 1.0)):
    expected = reference.pgd_step(x_adv, x, grad, alpha, eps, norm, clamp)
    atol = 0.0 if norm == "linf" else L2_ATOL[x_adv.dtype]
    assert out.dtype == x_adv.dtype and out.shape == x_adv.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("norm", ["linf", "l2"])
# 4800 elements per sample: several chunks per sample in the CUDA kernels; odd sizes leave SIMD tails.
@pytest.mark.parametrize("shape", [(1, 7), (3, 3, 5, 5), (129, 3, 4, 4), (3, 1000), (2, 3, 40, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("radii", ["number", "per_sample"])
def test_step_matches_reference(device, norm, shape, dtype, radii):
    x_adv, x, grad = make_inputs(shape, dtype, device)
    alpha, eps = RADII[norm]
    if radii == "per_sample":
        alpha, eps = per_sample(alpha, shape[0], device), per_sample(eps, shape[0], device)
    out = pgd_step(x_adv, x, grad, alpha=alpha, eps=eps, norm=norm)
    assert_matches_reference(out, x_adv, x, grad, alpha, eps, norm)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_and_mixed_layouts(device, norm, dtype):
    x_adv, x, grad = make_inputs((5, 3, 6, 7), dtype, device)
    x_adv = x_adv.contiguous(memory_format=torch.channels_last)
    grad_t = grad.transpose(2, 3).contiguous().transpose(2, 3)  # a strided, non-dense-order view
    alpha, eps = RADII[norm]
    out = pgd_step(x_adv, x, grad_t, alpha=alpha, eps=eps, norm=norm)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(out, x_adv, x, grad, alpha, eps, norm)
    out = pgd_step(x_adv.contiguous(), x.contiguous(memory_format=torch.channels_last), grad, alpha=alpha,
                   eps=eps, norm=norm)
    assert out.is_contiguous()
    assert_matches_reference(out, x_adv, x, grad, alpha, eps, norm)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_gradient_only_projects(device, norm):
    x_adv, x, _ = make_inputs((4, 3, 5, 5), device=device, spread=0.5)
    zero = torch.zeros_like(x)
    alpha, eps = RADII[norm]
    out = pgd_step(x_adv, x, zero, alpha=alpha, eps=eps, norm=norm)
    assert_matches_reference(out, x_adv, x, zero, alpha, eps, norm)
    assert torch.equal(pgd_step(x, x, zero, alpha=alpha, eps=eps, norm=norm), x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_dim_tensor_radii_and_clamp_box(device, norm):
    x_adv, x, grad = make_inputs((3, 10), device=device)
    alpha, eps = RADII[norm]
    out = pgd_step(x_adv, x, grad, alpha=torch.tensor(alpha), eps=torch.tensor(eps), norm=norm, clamp=(0.2, 0.7))
    assert_matches_reference(out, x_adv, x, grad, alpha, eps, norm, clamp=(0.2, 0.7))


@settings(max_examples=25, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2"]),
    batch=st.integers(1, 9),
    features=st.integers(1, 300),
    alpha=st.floats(0.0, 2.0),
    eps=st.floats(0.0, 2.0),
    spread=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_step_matches_reference_property(norm, batch, features, alpha, eps, spread, seed):
    x_adv, x, grad = make_inputs((batch, features), seed=seed, spread=spread)
    out = pgd_step(x_adv, x, grad, alpha=alpha, eps=eps, norm=norm)
    assert_matches_reference(out, x_adv, x, grad, alpha, eps, norm)
    dist = (out - x).abs().amax(dim=1) if norm == "linf" else (out - x).norm(dim=1)
    assert bool((dist <= eps * (1 + 1e-5) + 1e-6).all())
    assert out.min() >= 0 and out.max() <= 1


def test_output_has_no_derivative(device):
    x_adv, x, grad = make_inputs((2, 6), device=device)
    x_adv.requires_grad_(True)
    out = pgd_step(x_adv, x, grad, alpha=0.1, eps=0.2)
    with pytest.raises(RuntimeError, match="pgd_step has no derivative"):
        out.sum().backward()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_opcheck(device, norm):
    x_adv, x, grad = make_inputs((3, 3, 4, 5), device=device)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x_adv, x, grad)]
    alpha = per_sample(0.1, 3, device)
    samples = [
        (x_adv.requires_grad_(True), x, grad, None, None, 0.1, 0.2, norm, 0.0, 1.0),
        (cl[0], cl[1], grad, alpha, alpha * 2, 0.0, 0.0, norm, -1.0, 2.0),
        (x_adv[:1].detach(), x[:1], grad[:1], None, None, 0.0, 0.0, norm, 0.0, 0.0),
    ]
    for args in samples:
        # A sample that requires grad skips the AOT check: it differentiates the outputs, and
        # asking the step for a derivative is an error by design (tested below).
        utils = ("test_schema", "test_autograd_registration", "test_faketensor") if args[0].requires_grad else (
            "test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(torch.ops.fastabsld.pgd_step.default, args, test_utils=utils)
    torch.library.opcheck(torch.ops.fastabsld.pgd_step.default, (x_adv.detach(),) + samples[0][1:])


def test_compiled_attack_loop_fullgraph():
    """Five L-inf steps on a linear softmax model with its CE gradient written out, traced whole.

    aot_eager traces through Dynamo, the fake kernel and AOTAutograd; inductor's C++ code
    generation for the softmax would add ~10 s of compile time and is not about the op.
    """
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 4, generator=gen)
    x = torch.rand(6, 12, generator=gen)
    onehot = torch.nn.functional.one_hot(torch.arange(6) % 4, 4).float()

    def attack(x_adv, x):
        for _ in range(5):
            grad = (torch.softmax(x_adv @ weight, dim=1) - onehot) @ weight.t()
            x_adv = pgd_step(x_adv, x, grad, alpha=0.05, eps=0.1)
        return x_adv

    compiled = torch.compile(attack, fullgraph=True, dynamic=False, backend="aot_eager")
    torch.testing.assert_close(compiled(x.clone(), x), attack(x.clone(), x), rtol=0, atol=1e-6)


def test_inductor_compiles_a_loop_of_steps():
    x_adv, x, grad = make_inputs((4, 3, 5, 5))
    grads = torch.stack([grad, -grad, grad.roll(1, 0)])
    eps = per_sample(8 / 255, 4, "cpu")

    def steps(x_adv, x, grads, eps):
        for g in grads.unbind(0):
            x_adv = pgd_step(x_adv, x, g, alpha=2 / 255, eps=eps, norm="l2")
            x_adv = pgd_step(x_adv, x, g, alpha=2 / 255, eps=eps)
        return x_adv

    compiled = torch.compile(steps, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x_adv, x, grads, eps), steps(x_adv, x, grads, eps), rtol=0, atol=0)


BAD_ARGUMENTS = [
    ({"x": torch.zeros(3, 5)}, "same shape"),
    ({"grad": torch.zeros(3, 4, 1)}, "same shape"),
    ({"eps": -0.1}, "eps"),
    ({"eps": float("nan")}, "eps"),
    ({"alpha": float("nan")}, "alpha"),
    ({"alpha": torch.zeros(4)}, r"alpha.*\(3,\)"),
    ({"eps": torch.zeros(3, 1)}, r"eps.*\(3,\)"),
    ({"eps": torch.tensor([0.1, -0.1, 0.1])}, "eps"),
    ({"alpha": torch.tensor([0.1, float("nan"), 0.1])}, "alpha"),
    ({"clamp": (1.0, 0.0)}, "clamp"),
    ({"norm": "l1"}, "norm"),
]


@pytest.mark.parametrize("kwargs, match", BAD_ARGUMENTS)
def test_bad_input_is_a_value_error(kwargs, match):
    args = {"x_adv": torch.zeros(3, 4), "x": torch.zeros(3, 4), "grad": torch.zeros(3, 4), "alpha": 0.1,
            "eps": 0.2, **kwargs}
    with pytest.raises(ValueError, match=match):
        pgd_step(**args)


@pytest.mark.parametrize("clamp", [(0.0,), None, (0.0, 1.0, 2.0), ("low", 1.0)])
def test_clamp_that_is_not_a_pair_is_a_value_error(clamp):
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="clamp"):
        pgd_step(x, x, x, alpha=0.1, eps=0.2, clamp=clamp)


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ checks need fastabsld._C")
@pytest.mark.parametrize("kwargs, match", BAD_ARGUMENTS)
def test_the_kernels_check_their_arguments_too(kwargs, match):
    """The raw op (the C++ checks) rejects what the public function rejects."""
    args = {"x_adv": torch.zeros(3, 4), "x": torch.zeros(3, 4), "grad": torch.zeros(3, 4), "alpha": 0.1,
            "eps": 0.2, "clamp": (0.0, 1.0), "norm": "linf", **kwargs}
    alpha, eps = args["alpha"], args["eps"]
    alpha_t, alpha_f = (alpha, 0.0) if isinstance(alpha, torch.Tensor) else (None, alpha)
    eps_t, eps_f = (eps, 0.0) if isinstance(eps, torch.Tensor) else (None, eps)
    with pytest.raises(ValueError, match=match):
        torch.ops.fastabsld.pgd_step(args["x_adv"], args["x"], args["grad"], alpha_t, eps_t, alpha_f, eps_f,
                                     args["norm"], *args["clamp"])


@pytest.mark.parametrize("alpha", [True, torch.tensor([1, 2, 3]), torch.tensor([True, False, True]), torch.tensor(1)])
def test_bool_and_integer_radii_are_value_errors(alpha):
    """A bool (or an integer tensor) is a mistake, not a step size: it used to be taken as 1."""
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="alpha"):
        pgd_step(x, x, x, alpha=alpha, eps=0.1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_fallback_kernel_matches_the_reference(norm):
    """The plain PyTorch kernel registered when fastabsld._C is missing, against the oracle."""
    from fastabsld.ops import pgd as pgd_op

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 5, 5, generator=gen)
    x_adv = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=gen)
    alpha = 0.02 + torch.rand(6, generator=gen) * 0.1
    out = pgd_op.fallback_step(x_adv, x, grad, alpha, None, 0.0, 0.3, norm, 0.0, 1.0)
    torch.testing.assert_close(out, reference.pgd_step(x_adv, x, grad, alpha, 0.3, norm), rtol=0, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)


# ---- the step has no derivative: asking for one raises ----------------------------------------


def _step_of(x_adv, x, grad, norm):
    return pgd_step(x_adv, x, grad, alpha=0.1, eps=0.2, norm=norm)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("wrt", ["x_adv", "x", "grad"])
def test_a_backward_through_the_step_raises(device, norm, wrt):
    """Mixed into a graph with a differentiable path, the step used to count as a constant."""
    tensors = dict(zip(("x_adv", "x", "grad"), make_inputs((2, 6), device=device)))
    tensors[wrt].requires_grad_(True)
    out = _step_of(tensors["x_adv"], tensors["x"], tensors["grad"], norm)
    with pytest.raises(RuntimeError, match="pgd_step has no derivative"):
        (out + tensors[wrt]).sum().backward()
    with pytest.raises(RuntimeError, match="pgd_step has no derivative"):
        torch.autograd.grad(out.sum(), tensors[wrt])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_torch_func_transforms_raise(device, norm):
    x_adv, x, grad = make_inputs((2, 6), device=device)
    with pytest.raises(RuntimeError, match="pgd_step has no derivative"):
        torch.func.grad(lambda a: _step_of(a, x, grad, norm).sum())(x_adv)
    with pytest.raises((RuntimeError, NotImplementedError), match="pgd_step has no derivative"):
        torch.func.jvp(lambda a: _step_of(a, x, grad, norm), (x_adv,), (torch.ones_like(x_adv),))
    with torch.autograd.forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward mode"):
        _step_of(torch.autograd.forward_ad.make_dual(x_adv, torch.ones_like(x_adv)), x, grad, norm)


def test_the_step_without_grad_mode_has_no_graph(device):
    x_adv, x, grad = make_inputs((2, 6), device=device)
    x_adv.requires_grad_(True)
    with torch.no_grad():
        out = pgd_step(x_adv, x, grad, alpha=0.1, eps=0.2)
    assert not out.requires_grad and out.grad_fn is None
    out = pgd_step(x_adv.detach(), x, grad, alpha=0.1, eps=0.2)
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_a_zero_dim_cpu_radius_is_a_number(device, norm, monkeypatch):
    """A 0-d CPU alpha or eps is read on the host, never copied to the inputs' device on a call."""
    x_adv, x, grad = make_inputs((3, 5), device=device)
    copies = []
    original = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        copies.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    out = pgd_step(x_adv, x, grad, alpha=torch.tensor(0.1), eps=torch.tensor(0.2, dtype=torch.float64), norm=norm)
    monkeypatch.undo()
    assert copies == []
    assert torch.equal(out, pgd_step(x_adv, x, grad, alpha=0.1, eps=0.2, norm=norm))
    from fastabsld.ops.pgd import check_step_arguments
    assert check_step_arguments(torch.tensor(0.1), torch.tensor(0.2), (0, 1), 3, device)[:4] == (
        None, pytest.approx(0.1), None, pytest.approx(0.2))
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="alpha must be a non-negative number"):
            pgd_step(x_adv, x, grad, alpha=torch.tensor(bad), eps=0.2, norm=norm)


def test_the_fallback_raises_for_a_derivative_too():
    """Without the extension the op's Python autograd kernel behaves as the C++ one."""
    script = BLOCK_EXTENSION + textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("ignore")
        import torch, fastabsld
        from fastabsld.ops import pgd_step
        assert not fastabsld.HAS_EXTENSION
        x = torch.rand(2, 5)
        g = torch.randn(2, 5)
        for norm in ("linf", "l2"):
            xa = x.clone().requires_grad_(True)
            out = pgd_step(xa, x, g, alpha=0.1, eps=0.05, norm=norm)
            try:
                (out + xa).sum().backward()
                raise SystemExit("backward gave " + repr(xa.grad))
            except RuntimeError as error:
                assert "pgd_step has no derivative" in str(error), error
            with torch.autograd.forward_ad.dual_level():
                try:
                    pgd_step(torch.autograd.forward_ad.make_dual(x, g), x, g, alpha=0.1, eps=0.05, norm=norm)
                    raise SystemExit("forward mode gave a tangent")
                except NotImplementedError as error:
                    assert "forward mode" in str(error), error
            assert pgd_step(x, x, g, alpha=0.1, eps=0.05, norm=norm).grad_fn is None
        print("fallback ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "fallback ok" in result.stdout
