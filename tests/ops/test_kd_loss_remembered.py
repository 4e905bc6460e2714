"""Remembered eager calls of ``kd_kl_div``: a call with the metadata of an earlier one skips the
checks that one passed, and must still give the reference's numbers and every error a first call
would give.

The CPU tensors here take the extension's loss op when it is built (the remembered backend); the
Triton host path's remembered calls are tested in ``test_kd_loss_triton.py``.
"""

import math

import pytest
import torch

from fastabsld import reference
from fastabsld.loss import kd_kl_div
from fastabsld.ops import kd_loss
from fastabsld.ops._extension import HAS_EXTENSION

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="calls are remembered for the extension's eager op")


@pytest.fixture(autouse=True)
def forget():
    kd_loss._EAGER_CALLS.clear()
    yield
    kd_loss._EAGER_CALLS.clear()


def _case(batch=6, num_classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, num_classes, generator=gen).requires_grad_(True)
    t = torch.randn(batch, num_classes, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    tau = 0.5 + torch.rand(num_classes, generator=gen)
    return s, t, labels, tau


def _checks_run(monkeypatch):
    """Counts the public checks that run (one per call that is not remembered)."""
    runs = []
    real = kd_loss._check_logits
    monkeypatch.setattr(kd_loss, "_check_logits", lambda *a: runs.append(1) or real(*a))
    return runs


def test_a_remembered_call_skips_the_checks_and_matches_the_reference(monkeypatch):
    runs = _checks_run(monkeypatch)
    for seed in range(3):  # new values, same metadata
        s, t, labels, tau = _case(seed=seed)
        loss = kd_kl_div(s, t, labels=labels, teacher_temperature=tau, student_temperature=1.5, reduction="mean")
        (grad,) = torch.autograd.grad(loss, s)
        s64 = s.detach().double().requires_grad_(True)
        ref = reference.kd_kl_div(s64, t.double(), labels=labels, teacher_temperature=tau.double(),
                                  student_temperature=1.5, reduction="mean")
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad.double(), torch.autograd.grad(ref, s64)[0], rtol=1e-4, atol=1e-7)
    assert runs == [1]


@pytest.mark.parametrize("name", ["teacher_temperature", "student_temperature"])
@pytest.mark.parametrize("value, message", [(-1.0, "positive"), (0.0, "positive"), (math.nan, "positive"),
                                            (math.inf, "positive"), (1e-50, "underflows"), (1e39, "overflows"),
                                            ("2", "must be a number")])
def test_numbers_are_checked_on_every_call(name, value, message):
    s, t, labels, _ = _case()
    kd_kl_div(s, t, labels=labels, **{name: 2.0})
    assert len(kd_loss._EAGER_CALLS) == 1
    with pytest.raises(ValueError, match=message):
        kd_kl_div(s, t, labels=labels, **{name: value})


@pytest.mark.parametrize("value, message", [(-0.5, "non-negative"), (math.nan, "non-negative"),
                                            (math.inf, "non-negative")])
def test_a_number_sample_weight_is_checked_on_every_call(value, message):
    s, t, labels, _ = _case()
    kd_kl_div(s, t, labels=labels, sample_weight=0.5)
    with pytest.raises(ValueError, match=message):
        kd_kl_div(s, t, labels=labels, sample_weight=value)


def test_other_metadata_goes_through_the_checks():
    s, t, labels, tau = _case()
    kd_kl_div(s, t, labels=labels, teacher_temperature=tau)
    with pytest.raises(ValueError, match="labels must have"):
        kd_kl_div(s, t, labels=labels[:-1], teacher_temperature=tau)
    with pytest.raises(ValueError, match=r"per class must have shape \(C,\)"):
        kd_kl_div(s, t, labels=labels, teacher_temperature=tau[:-1])
    with pytest.raises(ValueError, match="must not require grad"):
        kd_kl_div(s, t, labels=labels, teacher_temperature=tau.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="same shape"):
        kd_kl_div(s, t[:, :-1], labels=labels, teacher_temperature=tau)
    with pytest.raises(ValueError, match="reduction"):
        kd_kl_div(s, t, labels=labels, teacher_temperature=tau, reduction="max")
    with pytest.raises(ValueError, match="needs labels"):
        kd_kl_div(s, t, teacher_temperature=tau)


def test_bad_values_inside_tensors_still_raise_on_the_cpu():
    s, t, labels, tau = _case()
    kd_kl_div(s, t, labels=labels, teacher_temperature=tau)
    with pytest.raises(RuntimeError, match="label"):
        kd_kl_div(s, t, labels=torch.full_like(labels, 99), teacher_temperature=tau)
    with pytest.raises(RuntimeError, match="temperature"):
        kd_kl_div(s, t, labels=labels, teacher_temperature=-tau)


def test_only_calls_passed_on_as_given_are_remembered():
    s, t, labels, tau = _case()
    kd_kl_div(s, t, labels=labels.int(), teacher_temperature=tau)  # labels converted per call
    kd_kl_div(s, t, labels=labels, teacher_temperature=torch.tensor(2.0))  # 0-d: expanded per call
    kd_kl_div(s, t, labels=labels, teacher_temperature=tau.double())  # converted to fp32 per call
    kd_kl_div(s[None], t[None], labels=labels[None], teacher_temperature=tau)  # (..., C) logits
    kd_kl_div(torch.nn.Parameter(s.detach()), t, labels=labels)  # a tensor subclass
    assert not kd_loss._EAGER_CALLS
    kd_kl_div(s, t, labels=labels, teacher_temperature=tau, sample_weight=torch.rand(6))
    assert len(kd_loss._EAGER_CALLS) == 1


def test_grad_mode_and_alignment_are_part_of_the_signature():
    s, t, labels, tau = _case()
    with torch.no_grad():
        assert not kd_kl_div(s, t, labels=labels, teacher_temperature=tau).requires_grad
    loss = kd_kl_div(s, t, labels=labels, teacher_temperature=tau)
    assert loss.requires_grad
    assert len(kd_loss._EAGER_CALLS) == 2
    storage = torch.randn(6 * 5 + 1)
    shifted = storage[1:].view(6, 5)  # 4 bytes past a 16-byte boundary: another signature
    torch.testing.assert_close(kd_kl_div(shifted, t, labels=labels, teacher_temperature=tau),
                               kd_kl_div(shifted.clone(), t, labels=labels, teacher_temperature=tau))
    assert len(kd_loss._EAGER_CALLS) == 4


def test_the_remembered_calls_are_bounded(monkeypatch):
    monkeypatch.setattr(kd_loss, "EAGER_CALLS_KEPT", 3)
    for num_classes in range(2, 10):
        s, t, labels, _ = _case(num_classes=num_classes)
        kd_kl_div(s, t, labels=labels)
        assert len(kd_loss._EAGER_CALLS) <= 3
