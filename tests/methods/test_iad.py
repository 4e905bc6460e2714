"""IADLoss against the official IAD-I.py, IAD-II's teacher weighting and Fair-IAD.py (tests/methods/published.py)."""

import io

import pytest
import torch

import fastabsld
from fastabsld.methods.fair import FairReweight
from fastabsld.methods.iad import IADLoss
from tests.methods import published
from tests.methods.helpers import leaves, logits_case, tolerance

TOL = tolerance(torch.float64)


def iad_case(batch=16, classes=10, seed=0):
    (adv, nat, teacher, teacher_adv), labels = logits_case(batch, classes, seed=seed, count=4)
    return adv, nat, teacher, teacher_adv, labels


def compare(ours, ref, ours_in, ref_in):
    torch.testing.assert_close(ours, ref, **TOL)
    ours.backward()
    ref.backward()
    for mine, theirs in zip(ours_in, ref_in):
        if mine.grad is None:
            assert theirs.grad is None or not theirs.grad.any()
        else:
            torch.testing.assert_close(mine.grad, theirs.grad, **TOL)


@pytest.mark.parametrize("epoch", [0, 59, 60, 120])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (3.0, 0.6)])
@pytest.mark.parametrize("batch,classes", [(1, 2), (16, 10), (5, 100)])
def test_loss_matches_published_iad_i(epoch, temperature, alpha, batch, classes):
    adv, nat, teacher, teacher_adv, labels = iad_case(batch, classes, seed=epoch)
    loss_fn = IADLoss(temperature=temperature, alpha=alpha, beta=0.1, warmup_epochs=60)
    loss_fn.set_epoch(epoch)
    ours_in, ref_in = leaves(adv, nat), leaves(adv, nat)
    ours = loss_fn(ours_in[0], ours_in[1], teacher, labels, teacher_adv)
    # The script's CE term and its self-introspection target are two forwards of the student on the clean
    # batch; one tensor with its graph stands for both.
    ref = published.iad_loss(ref_in[0], teacher, ref_in[1], ref_in[1], teacher_adv, labels, epoch=epoch, begin=60,
                             temp=temperature, alpha=alpha, beta=0.1)
    compare(ours, ref, ours_in, ref_in)
    if epoch >= 60:
        assert ours_in[1].grad.abs().sum() > 0  # the self-introspection target is differentiated


def test_warmup_is_ard_with_batchmean_and_needs_no_teacher_adv_logits():
    adv, nat, teacher, _, labels = iad_case(seed=3)
    loss_fn = IADLoss(temperature=2.0, warmup_epochs=5)
    assert not loss_fn.introspective and not loss_fn.needs_teacher_adv_logits and not loss_fn.needs_nat_logits
    ours_in, ref_in = leaves(adv), leaves(adv)
    ours = loss_fn(ours_in[0], None, teacher, labels)
    ref = published.ard_batchmean_loss(ref_in[0], teacher, nat, labels, temp=2.0, alpha=1.0)
    compare(ours, ref, ours_in, ref_in)
    loss_fn.set_epoch(5)
    assert loss_fn.introspective and loss_fn.needs_teacher_adv_logits and loss_fn.needs_nat_logits
    with pytest.raises(ValueError, match="teacher_adv_logits"):
        loss_fn(adv, nat, teacher, labels)
    with pytest.raises(ValueError, match="nat_logits"):
        loss_fn(adv, None, teacher, labels, teacher)


def test_trust_matches_the_scripts_per_sample_items():
    _, _, _, teacher_adv, labels = iad_case(seed=4)
    loss_fn = IADLoss(beta=0.3)
    torch.testing.assert_close(loss_fn.trust(teacher_adv, labels), published.iad_trust(teacher_adv, labels, 0.3), **TOL)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (2.0, 0.5)])
def test_weighted_teacher_term_matches_iad_ii_weighting(temperature, alpha):
    adv, nat, teacher, teacher_adv, labels = iad_case(seed=5)
    loss_fn = IADLoss(temperature=temperature, alpha=alpha, warmup_epochs=0, weight_teacher_term=True)
    ours_in, ref_in = leaves(adv, nat), leaves(adv, nat)
    ours = loss_fn(ours_in[0], ours_in[1], teacher, labels, teacher_adv)
    ref = published.iad_teacher_weighted_loss(ref_in[0], teacher, ref_in[1], teacher_adv, labels, temp=temperature,
                                              alpha=alpha, beta=0.1)
    compare(ours, ref, ours_in, ref_in)
    unweighted = IADLoss(temperature=temperature, alpha=alpha, warmup_epochs=0)(adv, nat, teacher, labels, teacher_adv)
    assert unweighted > ours.detach()


@pytest.mark.parametrize("epoch", [0, 60])
def test_fair_iad_matches_the_per_sample_loop(epoch):
    classes = 5
    adv, nat, teacher, teacher_adv, labels = iad_case(18, classes, seed=6)
    reweight = FairReweight(classes).double()
    reweight.class_weight.copy_(torch.tensor([2.5, 5 / 6, 1.0, 1.7, 0.9], dtype=torch.float64))
    loss_fn = IADLoss(warmup_epochs=60)
    loss_fn.set_epoch(epoch)
    ours_in, ref_in = leaves(adv, nat), leaves(adv, nat)
    ours = loss_fn(ours_in[0], ours_in[1], teacher, labels, teacher_adv, sample_weight=reweight.sample_weight(labels))
    ref = published.fair_iad_loss(ref_in[0], teacher, ref_in[1], teacher_adv, labels, reweight.class_weight,
                                  epoch=epoch, begin=60, temp=1.0, alpha=1.0, beta=0.1)
    compare(ours, ref, ours_in, ref_in)


def test_fp32_inputs():
    adv, nat, teacher, teacher_adv, labels = (t.float() if t.is_floating_point() else t for t in iad_case(seed=7))
    loss_fn = IADLoss(warmup_epochs=0)
    ours_in, ref_in = leaves(adv, nat), leaves(adv.double(), nat.double())
    ours = loss_fn(ours_in[0], ours_in[1], teacher, labels, teacher_adv)
    ref = published.iad_loss(ref_in[0], teacher.double(), ref_in[1], ref_in[1], teacher_adv.double(), labels, epoch=0,
                             begin=0, temp=1.0, alpha=1.0, beta=0.1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, **tolerance(torch.float32, factor=1024))


def test_epoch_in_state_dict():
    loss_fn = IADLoss(warmup_epochs=3)
    loss_fn.set_epoch(4)
    buffer = io.BytesIO()
    torch.save(loss_fn.state_dict(), buffer)
    buffer.seek(0)
    restored = IADLoss(warmup_epochs=3)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.epoch == 4 and restored.introspective


def test_exported():
    assert fastabsld.IADLoss is IADLoss


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(alpha=2.0), "alpha"),
    (dict(beta=-0.1), "beta"),
    (dict(warmup_epochs=-1), "warmup_epochs"),
    (dict(warmup_epochs=1.5), "warmup_epochs"),
    (dict(weight_teacher_term=1), "weight_teacher_term"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IADLoss(**kwargs)


def test_input_errors():
    adv, nat, teacher, teacher_adv, labels = iad_case(4, 3)
    loss_fn = IADLoss(warmup_epochs=0)
    with pytest.raises(ValueError, match="teacher_adv_logits"):
        loss_fn(adv, nat, teacher, labels, teacher_adv[:, :2])
    with pytest.raises(ValueError, match="epoch"):
        loss_fn.set_epoch(-1)
    with pytest.raises(ValueError, match="labels"):
        loss_fn.trust(teacher_adv, torch.tensor([0, 5, 1, 2]))
