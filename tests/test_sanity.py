"""Evaluation sanity checks: the paired test against hand-computed binomial tails, which pairs are ordered, each
check on hand-built results, and the whole on a model that masks its gradients (warnings) and the same model
without the masking (none)."""

import math

import numpy as np
import pytest
import torch

from fastabsld import sanity
from fastabsld.evaluation import evaluate

ATTACKS = ("clean", "fgsm", "pgd10", "pgd30", "cw10")


def results(*pairs, n=200):
    """Per-example correctness from (attack, examples right) pairs over n examples; nested sets, first n right."""
    return {name: np.arange(n) < right for name, right in pairs}


@pytest.mark.parametrize("b, c, expected", [
    (5, 0, 0.5 ** 5),                                          # every discordant example favours `better`
    (3, 1, (math.comb(4, 3) + math.comb(4, 4)) / 2 ** 4),      # P(X >= 3), X ~ Bin(4, 1/2)
    (1, 3, 1 - 1 / 2 ** 4),                                    # P(X >= 1)
    (0, 0, 1.0),                                               # no discordant example: no evidence
    (10, 10, sum(math.comb(20, k) for k in range(10, 21)) / 2 ** 20),
])
def test_paired_p_value_against_hand_computed_tails(b, c, expected):
    better = np.array([True] * b + [False] * c + [True] * 7 + [False] * 4)
    worse = np.array([False] * b + [True] * c + [True] * 7 + [False] * 4)  # concordant examples do not count
    assert sanity.paired_p_value(better, worse) == pytest.approx(expected, rel=1e-12)


def test_paired_p_value_checks_shapes():
    with pytest.raises(ValueError, match="one shape"):
        sanity.paired_p_value(np.ones(3, bool), np.ones(4, bool))


def test_which_pairs_are_ordered():
    pairs = set(sanity._ordered_pairs(["clean", "fgsm", "pgd20", "pgd50", "cw20", "cw50", "autoattack"]))
    assert pairs == {("clean", "fgsm"), ("clean", "pgd20"), ("clean", "pgd50"), ("clean", "cw20"), ("clean", "cw50"),
                     ("clean", "autoattack"), ("fgsm", "pgd20"), ("fgsm", "pgd50"), ("fgsm", "autoattack"),
                     ("pgd20", "pgd50"), ("cw20", "cw50"), ("pgd20", "autoattack"), ("pgd50", "autoattack"),
                     ("cw20", "autoattack"), ("cw50", "autoattack")}


def test_order_fires_beyond_noise_only():
    # PGD-50 right on 20 examples that PGD-20 gets wrong, never the reverse: p = 2^-20 x 6 pairs.
    fired = sanity.order_warnings(results(("clean", 150), ("fgsm", 100), ("pgd20", 60), ("pgd50", 80)))
    assert [(w.check, w.attacks) for w in fired] == [("order", ("pgd20", "pgd50"))]
    assert fired[0].p_value == pytest.approx(0.5 ** 20 * 6)
    assert "pgd50 accuracy 40.0% is above pgd20 30.0%" in fired[0].message
    # Three examples the other way: within noise (p = 7/8 before the correction).
    assert sanity.order_warnings(results(("pgd20", 60), ("pgd50", 63))) == []
    # PGD above FGSM, and an attack above clean, are caught too.
    fired = sanity.order_warnings(results(("clean", 100), ("fgsm", 120), ("pgd20", 150)))
    assert {w.attacks for w in fired} == {("clean", "fgsm"), ("clean", "pgd20"), ("fgsm", "pgd20")}


def test_order_corrects_for_the_pairs_tested():
    # 6 discordant examples: p = 1/64 < 0.05 alone, but not over 3 pairs (3/64 < 0.05) nor 6 (6/64 > 0.05).
    assert len(sanity.order_warnings(results(("pgd20", 60), ("pgd50", 66)))) == 1
    assert sanity.order_warnings(results(("clean", 190), ("fgsm", 150), ("pgd20", 60), ("pgd50", 66))) == []


def test_masking_needs_pgd_equal_to_fgsm_and_a_clear_gap():
    masked = results(("fgsm", 120), ("pgd20", 120), ("cw20", 100))
    fired = sanity.masking_warnings(masked)
    assert [(w.check, w.attacks) for w in fired] == [("masking", ("pgd20", "fgsm", "cw20"))]
    assert "cw20 is 10.0% lower" in fired[0].message
    # PGD clearly below FGSM: its gradient works, CW lower still is no sign of masking.
    assert sanity.masking_warnings(results(("fgsm", 160), ("pgd20", 120), ("cw20", 100))) == []
    # A gap below MASKING_GAP (2 points of 1000 examples, significant) is not "several points".
    assert sanity.masking_warnings(results(("fgsm", 500), ("pgd20", 500), ("cw20", 485), n=1000)) == []
    # Without FGSM, or without a CW / AutoAttack figure, nothing to compare.
    assert sanity.masking_warnings(results(("pgd20", 120), ("cw20", 100))) == []
    assert sanity.masking_warnings(results(("fgsm", 120), ("pgd20", 120))) == []


def test_unbounded_against_chance():
    fired = sanity.unbounded_warning(np.arange(100) < 30, num_classes=10, eps=1.0)
    assert fired.check == "unbounded" and "30.0%, above chance (10.0%)" in fired.message
    assert fired.p_value == pytest.approx(sum(math.comb(100, k) * 0.1 ** k * 0.9 ** (100 - k)
                                              for k in range(30, 101)), rel=1e-9)
    assert sanity.unbounded_warning(np.arange(100) < 12, num_classes=10, eps=1.0) is None  # within noise of chance
    assert sanity.unbounded_warning(np.zeros(100, bool), num_classes=10, eps=1.0) is None


class Linear(torch.nn.Module):
    """A linear classifier whose logits may be scaled: x1e4 saturates the softmax, so that the cross-entropy's
    gradient is exactly 0 on every confidently classified example while the logits (CW's loss) keep theirs."""

    def __init__(self, weight, bias, scale=1.0):
        super().__init__()
        self.weight, self.bias, self.scale = torch.nn.Parameter(weight), torch.nn.Parameter(bias), scale

    def forward(self, x):
        return self.scale * (x.flatten(1) @ self.weight.T + self.bias)


@pytest.fixture(scope="module")
def blobs():
    """400 examples of 4 classes in [0, 1]^64 and a logistic regression fitted to them."""
    gen = torch.Generator().manual_seed(0)
    centres = 0.3 + 0.4 * torch.rand(4, 64, generator=gen)
    y = torch.arange(400) % 4
    x = (centres[y] + 0.3 * torch.randn(400, 64, generator=gen)).clamp(0, 1)
    model = Linear(torch.zeros(4, 64), torch.zeros(4))
    optimiser = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(200):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return x, y, model.weight.detach(), model.bias.detach()


def _checks(model, x, y):
    loader = list(zip(x.split(100), y.split(100)))
    ev = evaluate(model, loader, ATTACKS, eps=0.05, alpha=0.05 / 3, progress=False)
    warnings = sanity.check({a: ev.correct(a) for a in ev})
    unbounded = evaluate(model, loader, (f"pgd{sanity.UNBOUNDED_STEPS}",), eps=1.0, alpha=sanity.UNBOUNDED_STEP,
                         progress=False)
    warning = sanity.unbounded_warning(unbounded.correct(f"pgd{sanity.UNBOUNDED_STEPS}"), 4, 1.0)
    return ev, warnings + ([warning] if warning else [])


def test_masked_gradients_are_flagged_and_honest_ones_are_not(blobs):
    x, y, weight, bias = blobs
    honest, honest_warnings = _checks(Linear(weight, bias), x, y)
    assert honest["clean"]["average"] > 0.9 and honest["pgd10"]["average"] < honest["clean"]["average"] - 0.2
    assert honest_warnings == []
    masked, masked_warnings = _checks(Linear(weight, bias, scale=1e4), x, y)
    # The same decisions (clean accuracy equal), but the cross-entropy attacks find nothing.
    assert masked["clean"]["average"] == honest["clean"]["average"]
    assert masked["pgd10"]["average"] > honest["pgd10"]["average"] + 0.2
    assert {w.check for w in masked_warnings} == {"masking", "unbounded"}
