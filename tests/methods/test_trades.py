"""TRADESLoss and the TRADES attack against the official trades.py (tests/methods/published.py)."""

import pytest
import torch
import torch.nn.functional as F

import fastabsld
from fastabsld.methods.trades import RANDOM_START, TRADESLoss, trades_attack, trades_attack_loss
from tests.methods import published
from tests.methods.helpers import STEP_ATOL, images, leaves, logits_case, small_model, stored_tolerance, tolerance


@pytest.mark.parametrize("batch,classes", [(1, 2), (7, 3), (16, 10), (5, 100)])
@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_loss_value_and_gradients_match_published(batch, classes, beta):
    (adv, nat, _), labels = logits_case(batch, classes)
    ours_in, ref_in = leaves(adv, nat), leaves(adv, nat)
    ours = TRADESLoss(beta)(*ours_in, labels)
    ref = published.trades_outer_from_logits(*ref_in, labels, beta)
    torch.testing.assert_close(ours, ref, **tolerance(torch.float64))
    ours.backward()
    ref.backward()
    for mine, theirs in zip(ours_in, ref_in):  # the KL's target (nat) receives gradient too
        torch.testing.assert_close(mine.grad, theirs.grad, **tolerance(torch.float64))
    assert ours_in[1].grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_computed_in_fp32(dtype):
    (adv, nat, _), labels = logits_case(32, 10, seed=3, dtype=dtype)
    ours_in, ref_in = leaves(adv, nat), leaves(adv.double(), nat.double())
    ours = TRADESLoss(6.0)(*ours_in, labels)
    ref = published.trades_outer_from_logits(*ref_in, labels, 6.0)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, **tolerance(dtype))
    ours.backward()
    ref.backward()
    for mine, theirs in zip(ours_in, ref_in):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, **stored_tolerance(dtype))


def test_parameter_gradients_match_published_model_loss():
    """The official loss calls model(x_natural) twice, both differentiated; one forward with its graph is the same."""
    model, reference = small_model(18, 4, seed=1), small_model(18, 4, seed=1)
    x = images(8, seed=2)
    x_adv = (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)).clamp(0, 1)
    labels = torch.arange(8) % 4
    TRADESLoss(6.0)(model(x_adv), model(x), labels).backward()
    published.trades_outer(reference, x, x_adv, labels, 6.0).backward()
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, **tolerance(torch.float64, factor=1024))


def test_attack_objective_value_and_input_gradient():
    model = small_model(18, 5, seed=4)
    x = images(6, seed=3)
    x_adv = (x + 0.02).requires_grad_()
    ref_adv = x_adv.detach().clone().requires_grad_()
    with torch.no_grad():
        nat = model(x)
    ours = trades_attack_loss(nat)(model(x_adv))
    ref = published.trades_attack_objective(model(ref_adv), model(x))
    torch.testing.assert_close(ours, ref, **tolerance(torch.float64))
    (mine,) = torch.autograd.grad(ours, x_adv)
    (theirs,) = torch.autograd.grad(ref, ref_adv)
    torch.testing.assert_close(mine, theirs, **tolerance(torch.float64))


@pytest.mark.parametrize("steps", [0, 1, 10])
def test_attack_matches_published_trajectory(steps):
    """Same generator state: the official 0.001 N(0, 1) start and the 10 steps land on the same points."""
    model = small_model(18, 4, seed=7).eval()
    x = images(12, seed=8)
    eps, alpha = 0.031, 0.007
    ours = trades_attack(model, x, eps=eps, alpha=alpha, steps=steps, generator=torch.Generator().manual_seed(11))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=x.dtype)
    ref = published.trades_attack(model, x, noise, step_size=alpha, epsilon=eps, perturb_steps=steps)
    torch.testing.assert_close(ours, ref, rtol=0, atol=STEP_ATOL)
    if steps:
        assert (ours - x).abs().amax() > 0.5 * min(steps * alpha, eps)
        assert (ours - x).abs().amax() <= eps + STEP_ATOL
    assert RANDOM_START == "normal"


def test_attack_raises_the_objective():
    model = small_model(18, 4, seed=9).eval()
    x = images(16, seed=1)
    x_adv = trades_attack(model, x, eps=0.05, alpha=0.01, steps=5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nat = model(x)
        start = trades_attack_loss(nat)(model(x + 0.001))
        end = trades_attack_loss(nat)(model(x_adv))
    assert end > 10 * start


def test_sample_weight_multiplies_each_row_of_both_terms():
    (adv, nat, _), labels = logits_case(9, 4, seed=6)
    weight = torch.linspace(0.5, 2.0, 9, dtype=torch.float64)
    ours_in, ref_in = leaves(adv, nat), leaves(adv, nat)
    ours = TRADESLoss(2.0)(*ours_in, labels, sample_weight=weight)
    kl = F.kl_div(F.log_softmax(ref_in[0], 1), F.softmax(ref_in[1], 1), reduction="none").sum(1)
    ce = F.cross_entropy(ref_in[1], labels, reduction="none")
    ref = (weight * (ce + 2.0 * kl)).sum() / 9
    torch.testing.assert_close(ours, ref, **tolerance(torch.float64))
    ours.backward()
    ref.backward()
    for mine, theirs in zip(ours_in, ref_in):
        torch.testing.assert_close(mine.grad, theirs.grad, **tolerance(torch.float64))


def test_exported():
    assert fastabsld.TRADESLoss is TRADESLoss
    assert fastabsld.methods.trades_attack is trades_attack


def test_errors():
    (adv, nat, _), labels = logits_case(4, 3)
    with pytest.raises(ValueError, match="beta"):
        TRADESLoss(-1.0)
    with pytest.raises(ValueError, match="nat_logits"):
        TRADESLoss()(adv, nat[:, :2], labels)
    with pytest.raises(ValueError, match="labels"):
        TRADESLoss()(adv, nat, labels.float())
    with pytest.raises(ValueError, match="labels"):
        TRADESLoss()(adv, nat, torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match="sample_weight"):
        TRADESLoss()(adv, nat, labels, sample_weight=torch.ones(3))
    with pytest.raises(ValueError, match="sample_weight"):
        TRADESLoss()(adv, nat, labels, sample_weight=torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="nat_logits"):
        trades_attack_loss(nat[0])
