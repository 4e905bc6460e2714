"""The fused PGD step's CUDA kernels against the reference at the benchmark shapes and dtypes, and attacks on CUDA."""

import pytest
import torch

from fastabsld import reference
from fastabsld.attack import ce_loss, pgd
from fastabsld.ops import pgd_step

pytestmark = pytest.mark.cuda

SHAPES = [(128, 3, 32, 32), (512, 3, 32, 32), (512, 3, 224, 224), (5, 3, 7, 9)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, layout, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.rand(shape, device="cuda", generator=gen)
    x_adv = (x + 0.02 * torch.randn(shape, device="cuda", generator=gen)).clamp(0, 1)
    grad = torch.randn(shape, device="cuda", generator=gen)
    tensors = [v.to(dtype) for v in (x_adv, x, grad)]
    if layout == "channels_last":
        tensors = [v.contiguous(memory_format=torch.channels_last) for v in tensors]
    return tensors


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_step_matches_the_reference(shape, dtype, norm, per_sample, layout):
    x_adv, x, grad = _inputs(shape, dtype, layout, seed=sum(shape))
    batch = shape[0]
    alpha, eps = (2 / 255, 8 / 255) if norm == "linf" else (0.1, 0.5)
    if per_sample:
        alpha = alpha * (0.5 + torch.rand(batch, device="cuda"))
        eps = eps * (0.5 + torch.rand(batch, device="cuda"))
    out = pgd_step(x_adv, x, grad, alpha=alpha, eps=eps, norm=norm)
    want = reference.pgd_step(x_adv, x, grad, alpha, eps, norm)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=2 * ulp + 1e-6)
    assert out.dtype == dtype and out.shape == x_adv.shape
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("shape", [(512, 3, 32, 32), (512, 3, 224, 224)], ids=str)
def test_l2_step_is_bit_identical_run_to_run(shape):
    x_adv, x, grad = _inputs(shape, torch.float32, "contiguous", seed=7)
    first = pgd_step(x_adv, x, grad, alpha=0.1, eps=0.5, norm="l2")
    for _ in range(3):
        assert torch.equal(pgd_step(x_adv, x, grad, alpha=0.1, eps=0.5, norm="l2"), first)


def test_unaligned_inputs_take_the_scalar_tails():
    """A storage offset of one element: no 16-byte alignment, the kernels must fall back and agree."""
    base = _inputs((9, 3, 11, 13), torch.float32, "contiguous", seed=11)
    x_adv, x, grad = (torch.cat([v.new_zeros(1), v.flatten()])[1:].view_as(v) for v in base)
    assert x_adv.data_ptr() % 16
    for norm in ("linf", "l2"):
        out = pgd_step(x_adv, x, grad, alpha=0.05, eps=0.1, norm=norm)
        torch.testing.assert_close(out, reference.pgd_step(x_adv, x, grad, 0.05, 0.1, norm), rtol=0, atol=1e-6)


def test_compiled_attack_loop_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 32 * 32, 10)).cuda().eval()
    x = torch.rand(64, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")

    def attack(inputs):
        return pgd(model, inputs, ce_loss(y), eps=8 / 255, alpha=2 / 255, steps=5, random_start="none")

    eager = attack(x)
    compiled = torch.compile(attack, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=2 / 255 + 1e-6)  # a flipped sign moves one step
    assert (compiled - eager).abs().gt(1e-6).float().mean() < 0.01


# The persistent L2 kernel: samples of several chunks, unaligned starts, fp64, the five-kernel
# path past the resident grid, and capture in a CUDA graph.
COOPERATIVE_SHAPES = [(7, 3, 97, 101), (3, 1, 12289), (33, 65536), (2, 3, 2048, 2048)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", COOPERATIVE_SHAPES, ids=str)
def test_large_l2_samples_match_the_reference(shape, dtype):
    x_adv, x, grad = _inputs(shape, dtype, "contiguous", seed=sum(shape))
    eps = 0.5 * (0.5 + torch.rand(shape[0], device="cuda"))
    out = pgd_step(x_adv, x, grad, alpha=0.1, eps=eps, norm="l2")
    want = reference.pgd_step(x_adv, x, grad, 0.1, eps, "l2")
    torch.testing.assert_close(out.double(), want.double(), rtol=0, atol=2 * torch.finfo(dtype).eps + 1e-6)
    first = pgd_step(x_adv, x, grad, alpha=0.1, eps=eps, norm="l2")
    assert torch.equal(first, out)  # every block of a sample sums the partials in one order


def test_large_l2_samples_at_an_odd_offset():
    base = _inputs((5, 3, 97, 101), torch.float32, "contiguous", seed=3)
    x_adv, x, grad = (torch.cat([v.new_zeros(3), v.flatten()])[3:].view_as(v) for v in base)
    out = pgd_step(x_adv, x, grad, alpha=0.1, eps=0.5, norm="l2")
    torch.testing.assert_close(out, reference.pgd_step(x_adv, x, grad, 0.1, 0.5, "l2"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (16, 3, 224, 224)], ids=str)
def test_steps_with_0d_cpu_radii_capture_in_a_cuda_graph(shape):
    """A 0-d CPU alpha or eps is a number: nothing is copied to the device during capture."""
    x_adv, x, grad = _inputs(shape, torch.float32, "contiguous", seed=5)
    alpha, eps = torch.tensor(0.1), torch.tensor(0.5)
    want = pgd_step(x_adv, x, grad, alpha=0.1, eps=0.5, norm="l2")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pgd_step(x_adv, x, grad, alpha=alpha, eps=eps, norm="l2")  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pgd_step(x_adv, x, grad, alpha=alpha, eps=eps, norm="l2")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
