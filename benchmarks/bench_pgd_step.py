"""The fused PGD step and the whole attack against their usual formulations.

Groups ``step-<norm>-<B>``: one step at (B, 3, 32, 32) by the fused op, by the eager
torchattacks-style formulation (several elementwise ops) and by torch.compile of that
formulation. Group ``attack-10-steps``: a 10-step L-inf PGD on a small CNN by fastabsld.attack.pgd
and by torchattacks.PGD. Targets on the CPU: step >= 3x eager and no slower than torch.compile;
attack no slower than torchattacks.

Run: ``python -m pytest benchmarks/bench_pgd_step.py --benchmark-only``. With
``--benchmark-disable`` every case runs once at a small size and the torch.compile baseline is
skipped (its compile alone takes tens of seconds on a small CPU).
"""

import pytest
import torch
import torchattacks

from benchmarks import summary
from fastabsld import attack
from fastabsld.ops import pgd_step

EPS = {"linf": 8 / 255, "l2": 0.5}
ALPHA = {"linf": 2 / 255, "l2": 0.1}


def eager_linf_step(x_adv, x, grad, alpha, eps):
    """torchattacks.PGD's update."""
    x_adv = x_adv + alpha * grad.sign()
    delta = torch.clamp(x_adv - x, min=-eps, max=eps)
    return torch.clamp(x + delta, min=0, max=1)


def eager_l2_step(x_adv, x, grad, alpha, eps):
    """torchattacks.PGDL2's update."""
    batch = x_adv.shape[0]
    grad_norms = grad.reshape(batch, -1).norm(p=2, dim=1) + 1e-10
    x_adv = x_adv + alpha * grad / grad_norms.reshape(batch, 1, 1, 1)
    delta = x_adv - x
    delta_norms = delta.reshape(batch, -1).norm(p=2, dim=1)
    factor = torch.minimum(eps / delta_norms, torch.ones_like(delta_norms))
    return torch.clamp(x + delta * factor.reshape(-1, 1, 1, 1), min=0, max=1)


EAGER = {"linf": eager_linf_step, "l2": eager_l2_step}
COMPILED = {norm: torch.compile(fn, fullgraph=True, dynamic=False) for norm, fn in EAGER.items()}


def fused_step(norm):
    def step(x_adv, x, grad, alpha, eps):
        return pgd_step(x_adv, x, grad, alpha=alpha, eps=eps, norm=norm)

    return step


def step_inputs(batch):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=gen)
    x_adv = (x + 0.02 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return x_adv, x, torch.randn(x.shape, generator=gen)


@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
@pytest.mark.parametrize("batch", [128, 512])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_step(benchmark, norm, batch, impl):
    benchmark.group = f"step-{norm}-{batch}"
    if benchmark.disabled:
        if impl == "compiled":
            pytest.skip("the torch.compile baseline is timed only with benchmarks enabled")
        batch = 4
    fn = {"fused": fused_step(norm), "eager": EAGER[norm], "compiled": COMPILED.get(norm)}[impl]
    x_adv, x, grad = step_inputs(batch)
    alpha, eps = ALPHA[norm], EPS[norm]
    if not benchmark.disabled:
        fn(x_adv, x, grad, alpha, eps)  # compile / warm up outside the timing
    # At least: read x_adv, x and grad, write the result.
    summary.record(benchmark, op=f"pgd_step {norm} (B, 3, 32, 32)", case=f"B={batch}",
                   impl={"fused": "fastabsld", "compiled": "compile"}.get(impl, impl), nbytes=4 * x.numel() * 4)
    out = benchmark(fn, x_adv, x, grad, alpha, eps)
    expected = EAGER[norm](x_adv, x, grad, alpha, eps)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10),
    ).eval()


@pytest.mark.parametrize("impl", ["fastabsld", "torchattacks"])
def test_attack(benchmark, impl):
    benchmark.group = "attack-10-steps"
    model = small_cnn()
    batch = 2 if benchmark.disabled else 64
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    if impl == "fastabsld":
        def run():
            return attack.pgd(model, x, attack.ce_loss(y), eps=8 / 255, alpha=2 / 255, steps=10, random_start="none")
    else:
        torchattack = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=False)

        def run():
            return torchattack(x, y)

    summary.record(benchmark, op="PGD-10 attack, small CNN", case=f"B={batch} (3, 32, 32)", impl=impl)
    out = benchmark(run)
    assert (out - x).abs().max() <= 8 / 255 + 1e-6
