"""Intervals and verdicts for a table of methods x seeds, from each run's per-example test results.

Every run of a study is evaluated on the same test examples, so two methods can be compared on
the same images and the same seeds. For each method, attack and metric (average accuracy,
worst-class accuracy, NSD) this module gives

- the mean over seeds with a 95% interval, and
- the paired difference from a reference method with a 95% interval and a verdict,

from a hierarchical bootstrap: the seeds are resampled (with replacement) when there are at
least :data:`MIN_SEEDS`, then, for every drawn seed, the test images are resampled within each
class (stratified: every class keeps its number of images). One resample serves every method
and attack of the table, so both sides of a paired difference see the same seeds and the same
images. Worst-class accuracy and NSD are computed again on every resample, from its per-class
accuracies. With fewer than :data:`MIN_SEEDS` seeds the seeds stay as they are, and the
intervals cover the evaluation noise (which test images) but not the training noise (which seed).

A difference gets a verdict word (``"better"``, ``"worse"``, in the metric's direction) only when
it stays significant after Holm's correction over all the comparisons of the table (family-wise
error rate ``alpha``); otherwise it is ``"no detectable difference"``, reported with its interval.
The intervals are basic (reverse percentile) bootstrap intervals, which correct for the bias that
worst-class accuracy and NSD show under resampling, and the p-value of a comparison is the
bootstrap one that matches them (:func:`bootstrap_p`): before the correction, a 95% interval that
excludes 0 and a p-value below 0.05 go together.

Resampling ``n_k`` images of class ``k`` with replacement only matters through how many of them
are right under each (method, attack): the draw is made as a multinomial over the distinct
patterns of right and wrong that the class's images show, with their frequencies, which is the
same distribution as drawing image indices and far cheaper (a class rarely shows more than a few
patterns). numpy's ``Generator`` draws everything; ``scipy.stats.bootstrap`` resamples one level
without strata, so it serves the tests as the oracle of the one-seed, one-class case.
"""

import math
from dataclasses import dataclass

import numpy as np

METRICS = ("average", "worst", "nsd")
HIGHER_IS_BETTER = {"average": True, "worst": True, "nsd": False}
# The values a metric can take (an interval is clipped to them).
RANGE = {"average": (0.0, 1.0), "worst": (0.0, 1.0), "nsd": (0.0, math.inf)}
MIN_SEEDS = 3  # below this, the seeds are not resampled
CONFIDENCE = 0.95
ALPHA = 0.05  # family-wise error rate of the verdicts
N_RESAMPLES = 10000
NO_DIFFERENCE = "no detectable difference"


@dataclass(frozen=True)
class Study:
    """The per-example test results of a table: methods x seeds x attacks on the same examples.

    Attributes:
        labels: (N,) int labels of the test examples (the same examples for every run).
        correct: ``{method: {attack: (S, N) bool array}}``: row ``i`` is the run of seed ``seeds[i]``.
        seeds: the S seeds (distinct), in the order of the rows.
        num_classes: the number of classes C (classes without test examples are skipped by the metrics).
    """

    labels: np.ndarray
    correct: dict
    seeds: tuple
    num_classes: int

    @property
    def methods(self):
        """tuple of str: the methods, in the table's order."""
        return tuple(self.correct)

    @property
    def attacks(self):
        """tuple of str: the attacks (those of the first method; every method has them)."""
        return tuple(next(iter(self.correct.values())))

    @property
    def class_counts(self):
        """numpy.ndarray: (C,) the number of test examples of each class."""
        return np.bincount(self.labels, minlength=self.num_classes)


def check_seeds(seeds):
    """The seeds of a study as a list, refusing an empty list and a repeated seed.

    Args:
        seeds: the seeds (integers).

    Returns:
        list of int: the seeds.

    Raises:
        ValueError: no seed, a seed that is not an integer, or a seed given twice (its runs would be
            counted twice as if they were independent).
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must not be empty")
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in seeds):
        raise ValueError(f"seeds must be integers, got {seeds}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"seeds must not repeat a seed (a repeated run is not an independent one), got {seeds}: "
                         f"{', '.join(map(str, repeated))} more than once")
    return [int(s) for s in seeds]


def make_study(labels, correct, seeds, num_classes):
    """Checks and assembles the per-example results of a table.

    Args:
        labels: (N,) integer labels in ``[0, num_classes)``.
        correct: ``{method: {attack: sequence of S (N,) bool arrays (or an (S, N) array)}}``, the same
            attacks for every method, row ``i`` from seed ``seeds[i]``.
        seeds: the S distinct seeds.
        num_classes: C.

    Returns:
        Study: the checked results.

    Raises:
        ValueError: repeated seeds, no method, methods with different attacks, or arrays of the wrong
            shape or labels out of range, naming what is wrong.
    """
    seeds = tuple(check_seeds(seeds))
    labels = np.asarray(labels)
    if labels.ndim != 1 or not len(labels) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-d integer array, got shape {labels.shape} of {labels.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    if not correct:
        raise ValueError("correct must hold at least one method")
    checked, attacks = {}, None
    for method, by_attack in correct.items():
        if attacks is None:
            attacks = tuple(by_attack)
        if tuple(by_attack) != attacks:
            raise ValueError(f"every method needs the same attacks: {method} has {list(by_attack)}, "
                             f"the first method {list(attacks)}")
        checked[method] = {}
        for attack, rows in by_attack.items():
            rows = np.asarray(rows)
            if rows.shape != (len(seeds), len(labels)) or rows.dtype != np.bool_:
                raise ValueError(f"correct[{method!r}][{attack!r}] must be a bool array of shape "
                                 f"({len(seeds)} seeds, {len(labels)} examples), got {rows.shape} of {rows.dtype}")
            checked[method][attack] = rows
    if not attacks:
        raise ValueError("correct must hold at least one attack per method")
    return Study(labels.astype(np.int64), checked, seeds, int(num_classes))


def metrics_from_counts(counts, class_counts):
    """Average accuracy, worst-class accuracy and NSD from per-class numbers of right answers.

    Args:
        counts: (..., C) right answers per class.
        class_counts: (C,) examples per class; classes without examples are skipped (as
            :mod:`fastabsld.metrics` skips them).

    Returns:
        dict: ``{"average", "worst", "nsd"}`` -> arrays of shape ``counts.shape[:-1]`` (NSD is NaN where
        the mean class accuracy is 0).
    """
    present = class_counts > 0
    counts = np.asarray(counts, dtype=np.float64)[..., present]
    accuracy = counts / class_counts[present]
    mean = accuracy.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        nsd = np.where(mean > 0, accuracy.std(axis=-1) / mean, np.nan)
    return {"average": counts.sum(axis=-1) / class_counts.sum(), "worst": accuracy.min(axis=-1), "nsd": nsd}


def _observed_counts(study, columns):
    """(S, Q, C): right answers per seed, column and class on the test split as it is."""
    onehot = np.eye(study.num_classes, dtype=np.int64)[study.labels]  # (N, C)
    return np.einsum("snq,nc->sqc", columns.astype(np.int64), onehot)


def _resampled_counts(study, columns, drawn_seeds, rng):
    """(B, T, Q, C): right answers per resample, seed slot, column and class.

    Slot ``t`` of resample ``b`` is the run of seed index ``drawn_seeds[b, t]`` on a stratified resample
    of its test images, drawn as a multinomial over the class's distinct right/wrong patterns.
    """
    resamples, slots = drawn_seeds.shape
    counts = np.zeros((resamples, slots, study.num_classes, columns.shape[-1]))
    class_counts = study.class_counts
    for s in range(len(study.seeds)):
        chosen = drawn_seeds == s
        draws = int(chosen.sum())
        if not draws:
            continue
        block = np.zeros((draws, study.num_classes, columns.shape[-1]))
        for k in np.flatnonzero(class_counts):
            patterns, frequency = np.unique(columns[s, study.labels == k], axis=0, return_counts=True)
            times = rng.multinomial(class_counts[k], frequency / class_counts[k], size=draws)  # (draws, P)
            block[:, k] = times.astype(np.float64) @ patterns.astype(np.float64)
        counts[chosen] = block
    counts = counts.transpose(0, 1, 3, 2)
    return counts


def basic_interval(estimate, samples, confidence=CONFIDENCE):
    """The basic (reverse percentile) bootstrap interval: ``[2 t - q_high, 2 t - q_low]``.

    Unlike the percentile interval, it corrects for the bias of the estimate that the resampling
    shows: the worst-class accuracy of a resample is lower on average than the observed one (a
    minimum over noisier classes), its NSD higher; the percentile interval would then leave out
    the observed value itself.

    Args:
        estimate: the observed value t.
        samples: (B,) bootstrap samples (NaN ones, undefined figures, left out).
        confidence: the interval's level.

    Returns:
        list of float: [low, high]; NaN when the estimate or every sample is undefined.
    """
    finite = samples[np.isfinite(samples)]
    if not (finite.size and math.isfinite(estimate)):
        return [math.nan, math.nan]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [float(2 * estimate - high), float(2 * estimate - low)]


def bootstrap_p(estimate, samples):
    """The two-sided bootstrap p-value of a zero difference, the one that matches :func:`basic_interval`.

    The resamples' spread around the estimate stands for the estimate's spread around the truth, so
    under a true difference of 0 the estimate is as extreme as it is with probability about
    ``P*(d* - t >= t)`` (for t > 0); the p-value is twice the smaller tail,
    ``2 * min(P*(d* >= 2t), P*(d* <= 2t))``, with +1 in numerator and denominator. The basic interval
    at level ``1 - a`` excludes 0 exactly when this p-value is below ``a`` (up to the +1).

    Args:
        estimate: the observed difference t.
        samples: (B,) bootstrap samples of the difference (NaN ones left out).

    Returns:
        float: the p-value in (0, 1]; NaN when the estimate or every sample is undefined.
    """
    finite = samples[np.isfinite(samples)]
    if not (finite.size and math.isfinite(estimate)):
        return math.nan
    upper = (np.count_nonzero(finite >= 2 * estimate) + 1) / (finite.size + 1)
    lower = (np.count_nonzero(finite <= 2 * estimate) + 1) / (finite.size + 1)
    return float(min(1.0, 2 * min(upper, lower)))


def holm(p_values):
    """Holm's step-down adjustment of p-values (family-wise error control over all of them).

    Args:
        p_values: the p-values (NaN ones are not comparisons: they stay NaN and do not count).

    Returns:
        list of float: the adjusted p-values, in the input's order; a comparison is significant at level
        alpha when its adjusted p-value is <= alpha.
    """
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, math.nan)
    defined = np.flatnonzero(np.isfinite(p))
    order = defined[np.argsort(p[defined], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def verdict(diff, p_holm, higher_is_better, alpha=ALPHA):
    """The word for a paired difference: its direction when significant after Holm's correction.

    Args:
        diff: the difference method - reference.
        p_holm: its Holm-adjusted p-value.
        higher_is_better: the metric's direction.
        alpha: the family-wise error rate.

    Returns:
        str: ``"better"``, ``"worse"``, ``"no detectable difference"``, or ``"n/a"`` when undefined.
    """
    if not (math.isfinite(diff) and math.isfinite(p_holm)):
        return "n/a"
    if p_holm > alpha or diff == 0:
        return NO_DIFFERENCE
    return "better" if (diff > 0) == higher_is_better else "worse"


def seeds_warning(num_seeds):
    """The warning a table of fewer than :data:`MIN_SEEDS` seeds carries (None from MIN_SEEDS on).

    Args:
        num_seeds: the number of seeds.

    Returns:
        str or None: the warning.
    """
    if num_seeds >= MIN_SEEDS:
        return None
    return (f"only {num_seeds} seed{'s' if num_seeds != 1 else ''}: the intervals cover the evaluation noise (which "
            f"test images) only, not the training noise (which seed); use at least {MIN_SEEDS} seeds for a finding")


def summarise(study, reference, *, n_resamples=N_RESAMPLES, confidence=CONFIDENCE, alpha=ALPHA, seed=0):
    """Means, intervals, paired differences and verdicts of every method, attack and metric of a study.

    Args:
        study: :class:`Study` (see :func:`make_study`).
        reference: the method the paired differences are taken from.
        n_resamples: bootstrap resamples (the p-values have a resolution of about ``1 / n_resamples``,
            which Holm's correction divides by up to the number of comparisons).
        confidence: the level of the intervals.
        alpha: the family-wise error rate of the verdicts.
        seed: seed of the resampling (numpy ``Generator``): the same seed gives the same table.

    Returns:
        dict: ``{"summary": {method: {attack: {metric: cell}}}, "comparisons": int, "resamples",
        "confidence", "alpha", "seeds_resampled": bool, "warning": str or None}`` where a cell holds
        ``values`` (per seed), ``mean``, ``interval`` ([low, high]) and, for every method but the
        reference, ``diff`` (mean over seeds of method - reference on the same seed), ``diff_interval``,
        ``p``, ``p_holm`` and ``verdict``; the reference's cells say ``"verdict": "reference"``.

    Raises:
        ValueError: an unknown reference or a bad number of resamples, confidence or alpha.
    """
    if reference not in study.correct:
        raise ValueError(f"reference {reference!r} must be one of the compared methods {list(study.methods)}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 100:
        raise ValueError(f"n_resamples must be an integer >= 100, got {n_resamples!r}")
    for name, value in (("confidence", confidence), ("alpha", alpha)):
        if not (isinstance(value, (int, float)) and 0 < value < 1):
            raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    rng = np.random.default_rng(seed)
    num_seeds, methods = len(study.seeds), study.methods
    resample_seeds = num_seeds >= MIN_SEEDS
    if resample_seeds:
        drawn = rng.integers(0, num_seeds, size=(n_resamples, num_seeds))
    else:
        drawn = np.broadcast_to(np.arange(num_seeds), (n_resamples, num_seeds))
    class_counts = study.class_counts
    summary, pending = {method: {} for method in methods}, []
    r = methods.index(reference)
    for attack in study.attacks:
        # One resample of seeds (shared by every attack) and of images (shared by every method of the attack).
        columns = np.stack([study.correct[method][attack] for method in methods], axis=-1)  # (S, N, M)
        observed = metrics_from_counts(_observed_counts(study, columns), class_counts)  # metric -> (S, M)
        resampled = metrics_from_counts(_resampled_counts(study, columns, drawn, rng), class_counts)  # (B, T, M)
        for q, method in enumerate(methods):
            cells = summary[method][attack] = {}
            for metric in METRICS:
                values = observed[metric][:, q]
                mean = float(values.mean())
                low, high = basic_interval(mean, resampled[metric][:, :, q].mean(axis=1), confidence)
                bottom, top = RANGE[metric]
                cell = cells[metric] = {"values": values.tolist(), "mean": mean,
                                        "interval": [max(low, bottom), min(high, top)]}
                if method == reference:
                    cell["verdict"] = "reference"
                    continue
                diff = float((values - observed[metric][:, r]).mean())
                samples = (resampled[metric][:, :, q] - resampled[metric][:, :, r]).mean(axis=1)
                cell.update(diff=diff, diff_interval=basic_interval(diff, samples, confidence),
                            p=bootstrap_p(diff, samples))
                pending.append((cell, HIGHER_IS_BETTER[metric]))
    adjusted = holm([cell["p"] for cell, _ in pending])
    for (cell, higher), p_holm in zip(pending, adjusted):
        cell["p_holm"] = p_holm
        cell["verdict"] = verdict(cell["diff"], p_holm, higher, alpha)
    return {"summary": summary, "comparisons": int(np.isfinite(adjusted).sum()) if adjusted else 0,
            "resamples": n_resamples, "confidence": confidence, "alpha": alpha, "seeds_resampled": resample_seeds,
            "warning": seeds_warning(num_seeds)}
