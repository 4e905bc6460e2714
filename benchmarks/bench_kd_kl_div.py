"""Forward + backward of the KD loss with per-class teacher temperatures (the ABSLD use):
fastabsld.loss.kd_kl_div against the released ABSLD formulation in eager PyTorch and under
torch.compile; the fused loss and the eager formulation also with a per-class ``weight`` and a
per-row ``sample_weight`` (the ``*_weighted`` cases: the fused loss applies them inside its
kernel, so fastabsld_weighted / fastabsld should stay within 1.05). One pytest-benchmark group per
shape, so the ratios come from one run:

    python -m pytest benchmarks/bench_kd_kl_div.py --benchmark-only --benchmark-min-time=0.05

The cases of a group run one after the other, so on a shared machine a busy spell can land on
one of them. ``test_weighted_over_unweighted`` runs the fused weighted and unweighted steps
alternately and records the median of the per-pair time ratios in
``extra_info["weighted_over_unweighted"]`` (its group, "kd_kl_div weighted / unweighted", times the
pair); ``-s`` prints it.

Each case also records in ``extra_info["saved_bytes"]`` the bytes of the tensors autograd keeps
for the backward beyond the inputs (the extra memory of the loss). With --benchmark-disable the
compiled baseline is skipped (its compile takes longer than everything else here).
"""

import statistics
import time

import pytest
import torch

from benchmarks import summary
from fastabsld.loss import kd_kl_div
from tests.released import released_kl_mean

SHAPES = [(128, 10), (1024, 100), (256, 1000), (8, 32000)]
OP = "kd_kl_div forward+backward, per-class temperatures (fp32)"
IMPLS = ["fastabsld", "fastabsld_weighted", "eager", "eager_weighted", "compile"]


def released_absld(student_logits, teacher_logits, tau, labels):
    """The released ABSLD code's loss: teacher soft labels at the label's temperature, legacy mean."""
    p = torch.softmax(teacher_logits / tau[labels].unsqueeze(1), dim=1)
    return released_kl_mean(student_logits, p)


def released_absld_weighted(student_logits, teacher_logits, tau, labels, weight, sample_weight):
    """The same, each row's terms scaled by ``weight[label] * sample_weight``."""
    p = torch.softmax(teacher_logits / tau[labels].unsqueeze(1), dim=1)
    terms = p * (torch.log(p + 1e-5) - torch.log(torch.softmax(student_logits, dim=1)))
    return (terms * (weight[labels] * sample_weight).unsqueeze(1)).mean()


def fused(student_logits, teacher_logits, tau, labels):
    return kd_kl_div(student_logits, teacher_logits, labels=labels, teacher_temperature=tau, reduction="mean")


def fused_weighted(student_logits, teacher_logits, tau, labels, weight, sample_weight):
    return kd_kl_div(student_logits, teacher_logits, labels=labels, teacher_temperature=tau, reduction="mean",
                     weight=weight, sample_weight=sample_weight)


def inputs(batch, num_classes, weighted=False):
    gen = torch.Generator().manual_seed(0)
    student = (2 * torch.randn(batch, num_classes, generator=gen)).requires_grad_(True)
    teacher = 2 * torch.randn(batch, num_classes, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    tau = 0.5 + 4.5 * torch.rand(num_classes, generator=gen)
    if not weighted:
        return student, teacher, tau, labels
    weight = 0.5 + torch.rand(num_classes, generator=gen)
    sample_weight = 0.5 + torch.rand(batch, generator=gen)
    return student, teacher, tau, labels, weight, sample_weight


def saved_bytes(loss_fn, args):
    """Bytes of the tensors saved for backward that are not the inputs themselves."""
    input_ptrs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in input_ptrs:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(*args)
    return sum(storages.values())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kd_kl_div_forward_backward(benchmark, shape, impl):
    batch, num_classes = shape
    benchmark.group = f"kd_kl_div fwd+bwd B={batch} C={num_classes}"
    if impl == "compile" and benchmark.disabled:
        pytest.skip("the compiled baseline is only built when benchmarking")
    args = inputs(batch, num_classes, weighted=impl.endswith("_weighted"))
    student = args[0]
    loss_fn = {"fastabsld": fused, "eager": released_absld, "fastabsld_weighted": fused_weighted,
               "eager_weighted": released_absld_weighted}.get(impl)
    if impl == "compile":
        torch._dynamo.reset()
        loss_fn = torch.compile(released_absld, fullgraph=True)

    def step():
        student.grad = None
        loss_fn(*args).backward()

    step()
    if impl != "compile":
        benchmark.extra_info["saved_bytes"] = saved_bytes(loss_fn, args)
        benchmark.extra_info["gradient_buffer_bytes"] = batch * num_classes * student.element_size()
    # At least: read both logits and write the gradient (forward), read and scale it (backward).
    summary.record(benchmark, op=OP, case=f"{batch}x{num_classes}" + (" weighted" if impl.endswith("_weighted") else ""),
                   impl=impl.removesuffix("_weighted"), nbytes=5 * batch * num_classes * student.element_size(),
                   saved_bytes=benchmark.extra_info.get("saved_bytes"))
    if impl.startswith("fastabsld"):
        # The released formulation's 1e-5 changes the value only; the gradients agree.
        grad = student.grad
        student.grad = None
        (released_absld_weighted if impl.endswith("_weighted") else released_absld)(*args).backward()
        torch.testing.assert_close(grad, student.grad, rtol=1e-4, atol=1e-9)
        # One (B, C) gradient buffer, plus 0-d scalars (the counted rows).
        assert benchmark.extra_info["saved_bytes"] <= benchmark.extra_info["gradient_buffer_bytes"] + 64
    benchmark(step)


def interleaved_ratio(first, second, rounds):
    """Median over ``rounds`` pairs of time(second) / time(first), run alternately (both see the same load).

    Args:
        first: a callable (the baseline).
        second: a callable.
        rounds: pairs to time.

    Returns:
        float: the median ratio.
    """
    ratios = []
    for i in range(rounds):
        times = {}
        for name, fn in (("first", first), ("second", second)) if i % 2 else (("second", second), ("first", first)):
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        ratios.append(times["second"] / times["first"])
    return statistics.median(ratios)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_weighted_over_unweighted(benchmark, shape):
    """The fused loss with weight and sample_weight over the fused loss without, measured interleaved."""
    batch, num_classes = shape
    benchmark.group = "kd_kl_div weighted / unweighted"
    plain, weighted = inputs(batch, num_classes), inputs(batch, num_classes, weighted=True)

    def step(loss_fn, args):
        def run():
            args[0].grad = None
            loss_fn(*args).backward()
        return run

    plain_step, weighted_step = step(fused, plain), step(fused_weighted, weighted)
    for _ in range(10):
        plain_step()
        weighted_step()
    if not benchmark.disabled:
        rounds = max(50, min(2000, int(2e7 // (batch * num_classes))))
        ratio = interleaved_ratio(plain_step, weighted_step, rounds)
        benchmark.extra_info["weighted_over_unweighted"] = ratio
        summary.record(benchmark, op=OP, case=f"{batch}x{num_classes}", impl=None, weighted_over_unweighted=ratio)
        print(f"\nkd_kl_div fwd+bwd B={batch} C={num_classes}: weighted / unweighted = {ratio:.3f} ({rounds} pairs)")

    def pair():
        plain_step()
        weighted_step()

    benchmark(pair)
