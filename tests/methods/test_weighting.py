"""The methods' weighting (fastabsld/methods/_weighting.py, and the fused loss's sample_weight their KL terms take)
against fastabsld.reference's per-row KL."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastabsld import reference
from fastabsld.methods._weighting import check_sample_weight, weighted_ce
from fastabsld.ops.kd_loss import kd_kl_div
from tests.methods.helpers import leaves, stored_tolerance, tolerance

REDUCTIONS = ("none", "sum", "batchmean", "mean")


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 17), classes=st.integers(1, 40), reduction=st.sampled_from(REDUCTIONS),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       per_class=st.booleans(), student_tau=st.floats(0.5, 30.0), seed=st.integers(0, 2 ** 16),
       teacher_grad=st.booleans())
def test_fused_sample_weight_is_the_weighted_reference_rows(batch, classes, reduction, dtype, per_class, student_tau, seed,
                                                    teacher_grad):
    gen = torch.Generator().manual_seed(seed)
    student, teacher = (4 * torch.randn(batch, classes, generator=gen, dtype=torch.float64) for _ in range(2))
    student, teacher = student.to(dtype), teacher.to(dtype)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    weight = torch.rand(batch, generator=gen, dtype=torch.float64) * 3
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    tau_t = (0.5 + 4.5 * torch.rand(classes, generator=gen)).to(compute) if per_class else 2.0
    ours_in, ref_in = leaves(student, teacher), leaves(student, teacher)
    if not teacher_grad:
        ours_in[1].requires_grad_(False)
        ref_in[1].requires_grad_(False)
    kwargs = dict(labels=labels if per_class else None, teacher_temperature=tau_t, student_temperature=student_tau)
    ours = kd_kl_div(*ours_in, reduction=reduction, sample_weight=weight.to(compute), **kwargs)
    rows = reference.kd_kl_div(*ref_in, reduction="none", **kwargs) * weight.to(compute)
    denominator = {"none": None, "sum": 1, "batchmean": batch, "mean": batch * classes}[reduction]
    ref = rows if denominator is None else rows.sum() / denominator
    torch.testing.assert_close(ours, ref, **tolerance(dtype, factor=1024))
    (ours.sum() if reduction == "none" else ours).backward()
    (ref.sum() if reduction == "none" else ref).backward()
    for mine, theirs in zip(ours_in, ref_in):
        if theirs.requires_grad:
            torch.testing.assert_close(mine.grad, theirs.grad, **stored_tolerance(dtype, factor=1024))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unit_weights_are_the_unweighted_loss(reduction):
    gen = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(9, 5, generator=gen) for _ in range(2))
    torch.testing.assert_close(kd_kl_div(student, teacher, reduction=reduction, sample_weight=1.0),
                               kd_kl_div(student, teacher, reduction=reduction), rtol=0, atol=0)
    ones = torch.ones(9)
    torch.testing.assert_close(kd_kl_div(student, teacher, reduction=reduction, sample_weight=ones),
                               kd_kl_div(student, teacher, reduction=reduction), **tolerance(torch.float32))


def test_weighted_ce():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (7,), generator=gen)
    weight = torch.rand(7, generator=gen, dtype=torch.float64)
    expected = (weight * F.cross_entropy(logits, labels, reduction="none")).sum() / 7
    torch.testing.assert_close(weighted_ce(logits, labels, weight), expected, **tolerance(torch.float64))
    torch.testing.assert_close(weighted_ce(logits, labels), F.cross_entropy(logits, labels), rtol=0, atol=0)
    assert weighted_ce(logits.bfloat16(), labels).dtype == torch.float32


def test_check_sample_weight():
    assert check_sample_weight(None, 3, torch.device("cpu")) is None
    weight = torch.ones(3, requires_grad=True)
    assert not check_sample_weight(weight, 3, torch.device("cpu")).requires_grad
    for bad in (torch.ones(2), torch.ones(3, 1), torch.ones(3, dtype=torch.int64), [1.0, 1.0, 1.0]):
        with pytest.raises(ValueError, match="sample_weight"):
            check_sample_weight(bad, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="device"):
        check_sample_weight(torch.ones(3, device="meta"), 3, torch.device("cpu"))
