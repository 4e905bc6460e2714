"""ARDLoss and ARD's attack against the official main.py and Fair-ARD.py (tests/methods/published.py)."""

import pytest
import torch

import fastabsld
from fastabsld.attack import pgd_loop
from fastabsld.methods.ard import RANDOM_START, ARDLoss, ard_attack_loss
from fastabsld.methods.fair import FairReweight
from tests.methods import published
from tests.methods.helpers import STEP_ATOL, images, leaves, logits_case, small_model, stored_tolerance, tolerance


@pytest.mark.parametrize("batch,classes", [(1, 2), (7, 3), (16, 10), (5, 100)])
@pytest.mark.parametrize("temperature,alpha", [(30.0, 1.0), (4.0, 0.3), (1.0, 0.0)])
def test_loss_matches_published_main(batch, classes, temperature, alpha):
    (adv, nat, teacher), labels = logits_case(batch, classes)
    ours_in, ref_in = leaves(adv, nat), leaves(adv, nat)
    ours = ARDLoss(temperature=temperature, alpha=alpha)(ours_in[0], ours_in[1], teacher, labels)
    ref = published.ard_loss(ref_in[0], teacher, ref_in[1], labels, temp=temperature, alpha=alpha)
    torch.testing.assert_close(ours, ref, **tolerance(torch.float64))
    ours.backward()
    ref.backward()
    for mine, theirs in zip(ours_in, ref_in):
        if mine.grad is None:  # alpha = 1: no CE term, the clean logits are not used (the script multiplies by 0)
            assert alpha == 1 and not theirs.grad.any()
        else:
            torch.testing.assert_close(mine.grad, theirs.grad, **tolerance(torch.float64))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_batchmean_matches_the_iad_repository_ard(alpha):
    (adv, nat, teacher), labels = logits_case(12, 10, seed=4)
    ours_in, ref_in = leaves(adv, nat), leaves(adv, nat)
    ours = ARDLoss(temperature=2.0, alpha=alpha, reduction="batchmean")(ours_in[0], ours_in[1], teacher, labels)
    ref = published.ard_batchmean_loss(ref_in[0], teacher, ref_in[1], labels, temp=2.0, alpha=alpha)
    torch.testing.assert_close(ours, ref, **tolerance(torch.float64))
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours_in[0].grad, ref_in[0].grad, **tolerance(torch.float64))


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_fair_ard_matches_the_per_sample_loop(alpha):
    classes = 6
    (adv, nat, teacher), labels = logits_case(20, classes, seed=5)
    reweight = FairReweight(classes).double()
    reweight.class_weight.copy_(torch.linspace(5 / 6, 5 / 2, classes, dtype=torch.float64))
    ours_in, ref_in = leaves(adv, nat), leaves(adv, nat)
    ours = ARDLoss(temperature=30.0, alpha=alpha)(ours_in[0], ours_in[1], teacher, labels,
                                                  sample_weight=reweight.sample_weight(labels))
    ref = published.fair_ard_loss(ref_in[0], teacher, ref_in[1], labels, reweight.class_weight, temp=30.0, alpha=alpha)
    torch.testing.assert_close(ours, ref, **tolerance(torch.float64))
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours_in[0].grad, ref_in[0].grad, **tolerance(torch.float64))
    if alpha < 1:
        torch.testing.assert_close(ours_in[1].grad, ref_in[1].grad, **tolerance(torch.float64))


def test_fp32_inputs():
    (adv, nat, teacher), labels = logits_case(64, 10, seed=2, dtype=torch.float32)
    ours_in, ref_in = leaves(adv, nat), leaves(adv.double(), nat.double())
    ours = ARDLoss(temperature=30.0, alpha=0.5)(ours_in[0], ours_in[1], teacher, labels)
    ref = published.ard_loss(ref_in[0], teacher.double(), ref_in[1], labels, temp=30.0, alpha=0.5)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, **tolerance(torch.float32, factor=1024))
    ours.backward()
    ref.backward()
    for mine, theirs in zip(ours_in, ref_in):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, **stored_tolerance(torch.float32, factor=1024))


@pytest.mark.parametrize("steps", [1, 10])
def test_attack_matches_published_attack_pgd(steps):
    """From the official unclamped start x + U(-eps, eps), pgd_loop on ard_attack_loss takes the official steps."""
    model = small_model(18, 4, seed=3)
    x = images(10, seed=4)
    labels = torch.arange(10) % 4
    eps, alpha = 8 / 255, 2 / 255
    start = x + eps * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype) - 1)
    ours = pgd_loop(model, x, start, ard_attack_loss(labels), eps=eps, alpha=alpha, steps=steps)
    ref = published.ce_attack(model, x, labels, start, step_size=alpha, epsilon=eps, num_steps=steps)
    torch.testing.assert_close(ours, ref, rtol=0, atol=STEP_ATOL)
    assert RANDOM_START == "uniform"


def test_attack_objective_is_the_summed_student_ce():
    (logits, _, _), labels = logits_case(8, 5, seed=9)
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    torch.testing.assert_close(ard_attack_loss(labels)(logits), expected, rtol=0, atol=0)


def test_clean_logits_optional_without_the_ce_term():
    (adv, nat, teacher), labels = logits_case(6, 3, seed=1)
    loss_fn = ARDLoss(alpha=1.0)
    assert not loss_fn.needs_nat_logits
    torch.testing.assert_close(loss_fn(adv, None, teacher, labels), loss_fn(adv, nat, teacher, labels), rtol=0, atol=0)
    with pytest.raises(ValueError, match="nat_logits"):
        ARDLoss(alpha=0.5)(adv, None, teacher, labels)


def test_exported():
    assert fastabsld.ARDLoss is ARDLoss
    assert fastabsld.methods.ard_attack_loss is ard_attack_loss


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0), "temperature"),
    (dict(alpha=1.5), "alpha"),
    (dict(alpha=-0.1), "alpha"),
    (dict(reduction="sum"), "reduction"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ARDLoss(**kwargs)


def test_input_errors():
    (adv, nat, teacher), labels = logits_case(4, 3)
    with pytest.raises(ValueError, match="teacher_logits"):
        ARDLoss()(adv, nat, teacher[:, :2], labels)
    with pytest.raises(ValueError, match="labels"):
        ARDLoss()(adv, nat, teacher, torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match="sample_weight"):
        ARDLoss()(adv, nat, teacher, labels, sample_weight=torch.ones(4, 1))
