"""Sanity checks of an adversarial evaluation: the signs of a weak attack or of masked gradients.

The checks follow the usual checklist for adversarial evaluations (Carlini et al., 2019, "On
Evaluating Adversarial Robustness"), on the per-example results that
:func:`fastabsld.evaluation.evaluate` keeps, so that "beyond noise" is a paired test on the same
examples, not a fixed margin:

- **order**: a stronger attack must not leave more examples correct than a weaker one: FGSM is
  weaker than PGD, PGD-N weaker than PGD-M for N < M (CW likewise), PGD and CW weaker than
  AutoAttack, and no attack scores above the clean accuracy. The test is McNemar's exact test on the
  discordant examples: with ``b`` examples right under the stronger attack only and ``c`` under the
  weaker one only, ``b`` follows Binomial(b + c, 1/2) when both attacks are equally strong; the
  warning needs ``P(X >= b) < level``, Bonferroni-corrected over the pairs tested.
- **masking**: PGD is not detectably below FGSM, while CW or AutoAttack is detectably below PGD
  (same paired test, one-sided) by at least ``gap``: the gradient of the cross-entropy carries no
  signal (saturated softmax, quantised or non-differentiable layers) but the logits can be attacked.
- **unbounded**: with eps as large as the input range, a working attack drives accuracy to (near) 0;
  accuracy above chance (1 / classes) there, by an exact one-sided binomial test, means the attack
  cannot find the adversarial examples that must exist.

Each check that fires is a :class:`SanityWarning` record: its name, a one-line message, the attacks, the
p-value. A check that passes returns nothing.
"""

import dataclasses
import re

import numpy as np
from scipy import stats

LEVEL = 0.05
# The unbounded attack: PGD with eps the whole input range and steps of a tenth of it.
UNBOUNDED_STEPS = 20
UNBOUNDED_STEP = 0.1
MASKING_GAP = 0.02  # CW / AutoAttack this much (2 points) below PGD, beyond noise, when PGD equals FGSM
_STEPS = re.compile(r"^(pgd|cw)(\d+)$")


@dataclasses.dataclass(frozen=True)
class SanityWarning:
    """One failed sanity check.

    Attributes:
        check: ``"order"``, ``"masking"`` or ``"unbounded"``.
        message: one line saying what was seen and what it suggests.
        attacks: the attacks involved.
        p_value: the p-value of the test that fired (corrected for the number of tests).
    """

    check: str
    message: str
    attacks: tuple
    p_value: float

    def to_dict(self):
        """Returns: dict: the record, JSON-ready."""
        return {"check": self.check, "message": self.message, "attacks": list(self.attacks),
                "p_value": self.p_value}


def paired_p_value(better, worse):
    """One-sided exact McNemar test that ``better`` is right on more examples than ``worse``.

    Args:
        better: (N,) bool: examples classified correctly under one attack.
        worse: (N,) bool: the same examples under the other.

    Returns:
        float: ``P(X >= b)`` for X ~ Binomial(b + c, 1/2), where b counts the examples right under
        ``better`` only and c those right under ``worse`` only (1.0 when no example differs).
    """
    better, worse = np.asarray(better, dtype=bool), np.asarray(worse, dtype=bool)
    if better.shape != worse.shape or better.ndim != 1:
        raise ValueError(f"paired results must be two (N,) arrays of one shape, got {better.shape} and {worse.shape}")
    b = int(np.count_nonzero(better & ~worse))
    c = int(np.count_nonzero(~better & worse))
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue)


def _rank(name):
    """(family order, steps) of an attack for the weaker-stronger pairs; None for attacks outside them."""
    if name == "clean":
        return 0, 0
    if name == "fgsm":
        return 1, 1
    match = _STEPS.match(name)
    if match:
        return 2, int(match.group(2))
    if name == "autoattack":
        return 3, 0
    return None


def _ordered_pairs(names):
    """The (weaker, stronger) pairs of attacks whose order is known."""
    pairs = []
    for weak in names:
        for strong in names:
            rw, rs = _rank(weak), _rank(strong)
            if rw is None or rs is None or weak == strong:
                continue
            if rw[0] < rs[0]:
                if not (weak == "fgsm" and strong.startswith("cw")):  # CW's margin loss is another family
                    pairs.append((weak, strong))
            elif rw[0] == rs[0] == 2 and weak[:2] == strong[:2] and rw[1] < rs[1]:
                pairs.append((weak, strong))
    return pairs


def _percent(value):
    return f"{100 * value:.1f}%"


def order_warnings(correct, level=LEVEL):
    """The "order" check: a stronger attack right on more examples than a weaker one, beyond noise.

    Args:
        correct: ``{attack: (N,) bool}`` per-example correctness on the same examples (canonical names).
        level: the family-wise significance level (Bonferroni over the pairs tested).

    Returns:
        list of SanityWarning.
    """
    pairs = _ordered_pairs(list(correct))
    warnings = []
    for weak, strong in pairs:
        p = min(1.0, paired_p_value(correct[strong], correct[weak]) * len(pairs))
        if p < level:
            a_weak, a_strong = np.mean(correct[weak]), np.mean(correct[strong])
            what = ("an attack leaves more examples correct than no attack" if weak == "clean"
                    else "a stronger attack leaves more examples correct than a weaker one")
            warnings.append(SanityWarning("order", f"{strong} accuracy {_percent(a_strong)} is above {weak} "
                                             f"{_percent(a_weak)} beyond noise (paired p = {p:.2g}): {what}; the "
                                             "attack is failing (too few steps, too small a step, or masked "
                                             "gradients)", (weak, strong), p))
    return warnings


def masking_warnings(correct, level=LEVEL, gap=MASKING_GAP):
    """The "masking" check: PGD no better than FGSM while CW or AutoAttack is clearly below PGD.

    Args:
        correct: ``{attack: (N,) bool}`` per-example correctness on the same examples.
        level: the significance level (Bonferroni over the tests made).
        gap: the least accuracy difference (a fraction) between PGD and the lower attack.

    Returns:
        list of SanityWarning.
    """
    pgds = [name for name in correct if name.startswith("pgd")]
    lower = [name for name in correct if name.startswith("cw") or name == "autoattack"]
    if "fgsm" not in correct or not pgds or not lower:
        return []
    tests = len(pgds) * (1 + len(lower))
    warnings = []
    for pgd in pgds:
        p_pgd = min(1.0, paired_p_value(correct["fgsm"], correct[pgd]) * tests)
        if p_pgd < level:
            continue  # PGD is detectably stronger than FGSM: its gradients carry signal
        for other in lower:
            difference = np.mean(correct[pgd]) - np.mean(correct[other])
            p = min(1.0, paired_p_value(correct[pgd], correct[other]) * tests)
            if p < level and difference >= gap:
                warnings.append(SanityWarning(
                    "masking", f"{pgd} ({_percent(np.mean(correct[pgd]))}) is no lower than fgsm "
                               f"({_percent(np.mean(correct['fgsm']))}) while {other} is {_percent(difference)} "
                               f"lower (paired p = {p:.2g}): the cross-entropy gradient looks masked (saturated "
                               "softmax, quantised or non-differentiable layers); trust the lowest figure, and "
                               "try more attacks", (pgd, "fgsm", other), p))
    return warnings


def unbounded_warning(correct, num_classes, eps, level=LEVEL):
    """The "unbounded" check: accuracy above chance under an attack whose eps spans the whole input range.

    Args:
        correct: (N,) bool: per-example correctness under the unbounded attack.
        num_classes: C (chance is 1 / C).
        eps: the radius used (for the message).
        level: the significance level.

    Returns:
        SanityWarning or None.
    """
    correct = np.asarray(correct, dtype=bool)
    n, k = len(correct), int(np.count_nonzero(correct))
    if n == 0:
        return None
    chance = 1.0 / num_classes
    p = float(stats.binomtest(k, n, chance, alternative="greater").pvalue)
    if p >= level:
        return None
    return SanityWarning("unbounded", f"accuracy under an attack with eps = {eps:.3g} (the whole input range) is "
                                f"{_percent(k / n)}, above chance ({_percent(chance)}) beyond noise (p = {p:.2g}): "
                                "such an attack can reach any image, so it is not finding what exists; the "
                                "figures at the real eps overstate robustness", ("unbounded",), p)


def check(correct, level=LEVEL, gap=MASKING_GAP):
    """The "order" and "masking" checks of one evaluation.

    Args:
        correct: ``{attack: (N,) bool}`` per-example correctness on the same examples (an
            :class:`fastabsld.evaluation.Evaluation` gives it as ``{a: ev.correct(a) for a in ev}``).
        level: the significance level of each check.
        gap: the least accuracy gap of the masking check.

    Returns:
        list of SanityWarning: empty when nothing looks wrong.
    """
    return order_warnings(correct, level) + masking_warnings(correct, level, gap)
