"""The study's statistics against hand-computed bootstrap distributions, scipy's bootstrap, Holm's procedure worked
by hand, and the null case (identical configurations are never called different)."""

import math

import numpy as np
import pytest
from scipy import stats

from fastabsld.study.statistics import (NO_DIFFERENCE, basic_interval, bootstrap_p, check_seeds, holm, make_study,
                                        metrics_from_counts, summarise)


def _cells(out, method, attack="pgd20"):
    return out["summary"][method][attack]


def test_one_seed_one_class_is_a_binomial_by_hand():
    # 50 images of one class (and 50 of a class both get right): the method is right on 20, the reference on 10
    # of them, those 10 among the method's 20. A resample's difference in class 1 counts the resampled images of the
    # 10 "method only" ones: Binomial(50, 0.2) / 50, whose 2.5% and 97.5% quantiles are 5 and 16 (cdf 0.018 / 0.048
    # and 0.969 / 0.986: clear of the 2.5% and 97.5% lines). Basic interval: [2 * 0.2 - 0.32, 2 * 0.2 - 0.10].
    labels = np.repeat([0, 1], 50)
    method = np.r_[np.ones(50, bool), np.arange(50) < 20][None]
    reference = np.r_[np.ones(50, bool), np.arange(50) < 10][None]
    study = make_study(labels, {"ref": {"pgd20": reference}, "new": {"pgd20": method}}, [7], 2)
    out = summarise(study, "ref", n_resamples=10000)
    cells = _cells(out, "new")
    assert stats.binom.ppf([0.025, 0.975], 50, 0.2).tolist() == [5, 16]
    assert cells["worst"]["diff"] == pytest.approx(0.2)  # class 1: 0.4 against 0.2
    assert cells["worst"]["diff_interval"] == pytest.approx([0.08, 0.30])
    assert cells["average"]["diff"] == pytest.approx(0.1)  # the same counts over 100 images
    assert cells["average"]["diff_interval"] == pytest.approx([0.04, 0.15])
    assert cells["worst"]["verdict"] == cells["average"]["verdict"] == "better"
    assert out["warning"].startswith("only 1 seed: the intervals cover the evaluation noise")
    assert not out["seeds_resampled"]
    # The reference's own mean: class 1 at 10/50, Binomial(50, 0.2) again around it.
    assert _cells(out, "ref")["worst"]["mean"] == pytest.approx(0.2)
    assert _cells(out, "ref")["worst"]["interval"] == pytest.approx([0.08, 0.30])


def test_three_seeds_are_resampled_by_hand():
    # 10 classes of 10 images, every class uniform (one right/wrong pattern): resampling images changes nothing, and
    # only the seeds vary. Seed i: the reference misses classes 0..i entirely, the method gets everything: average
    # differences 0.1, 0.2, 0.3. The mean of 3 draws with replacement takes 0.1 with probability 1/27 (> 2.5%) and
    # 0.3 with 1/27: quantiles 0.1 and 0.3, basic interval [0.4 - 0.3, 0.4 - 0.1].
    labels = np.repeat(np.arange(10), 10)
    reference = np.stack([labels > i for i in range(3)])
    method = np.ones((3, 100), bool)
    study = make_study(labels, {"ref": {"pgd20": reference}, "new": {"pgd20": method}}, [0, 1, 2], 10)
    out = summarise(study, "ref", n_resamples=20000)
    cell = _cells(out, "new")["average"]
    assert cell["values"] == [1.0, 1.0, 1.0] and cell["diff"] == pytest.approx(0.2)
    assert cell["diff_interval"] == pytest.approx([0.1, 0.3])
    assert cell["p"] == pytest.approx(2 / 20001) and cell["verdict"] == "better"
    assert _cells(out, "ref")["average"]["interval"] == pytest.approx([0.7, 0.9])
    assert out["seeds_resampled"] and out["warning"] is None
    # Two of those seeds are not resampled: the interval is the evaluation noise alone, here none.
    two = summarise(make_study(labels, {"ref": {"pgd20": reference[:2]}, "new": {"pgd20": method[:2]}}, [0, 1], 10),
                    "ref", n_resamples=1000)
    assert _cells(two, "new")["average"]["diff_interval"] == pytest.approx([0.15, 0.15])
    assert "only 2 seeds" in two["warning"]


def test_one_level_case_matches_scipy_bootstrap():
    # One seed, one class: no strata, no seeds: scipy's paired bootstrap resamples exactly as the study does.
    rng = np.random.default_rng(3)
    n = 400
    reference = rng.random(n) < 0.6
    method = np.where(rng.random(n) < 0.8, reference, rng.random(n) < 0.7)  # correlated with the reference
    study = make_study(np.zeros(n, np.int64), {"ref": {"clean": reference[None]}, "new": {"clean": method[None]}},
                       [0], 1)
    ours = _cells(summarise(study, "ref", n_resamples=20000, seed=1), "new", "clean")["average"]
    oracle = stats.bootstrap((method.astype(float), reference.astype(float)),
                             lambda m, r, axis: (m - r).mean(axis=axis), paired=True, vectorized=True,
                             n_resamples=20000, method="basic", random_state=np.random.default_rng(2))
    assert ours["diff"] == pytest.approx((method.mean() - reference.mean()))
    # Two Monte Carlo estimates of the same quantiles: within 1.5 images of each other.
    assert ours["diff_interval"] == pytest.approx([oracle.confidence_interval.low, oracle.confidence_interval.high],
                                                  abs=1.5 / n)


def test_identical_configurations_are_no_detectable_difference():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 72)
    runs = {attack: rng.random((3, 720)) < 0.7 for attack in ("clean", "fgsm", "pgd20")}
    study = make_study(labels, {"a": runs, "b": {k: v.copy() for k, v in runs.items()}}, [0, 1, 2], 10)
    out = summarise(study, "a", n_resamples=2000)
    assert out["comparisons"] == 9
    for attack in runs:
        for metric, cell in _cells(out, "b", attack).items():
            assert cell["diff"] == 0.0 and cell["diff_interval"] == [0.0, 0.0], (attack, metric)
            assert cell["p"] == 1.0 and cell["verdict"] == NO_DIFFERENCE


def test_independent_runs_of_one_accuracy_are_rarely_called_different():
    # Two methods drawn from one distribution (a noisy null): Holm keeps the family-wise error near 5%;
    # over 20 tables of 9 comparisons at most a few verdicts may appear, not one per table.
    labels = np.repeat(np.arange(10), 72)
    called = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        study = make_study(labels, {m: {a: rng.random((3, 720)) < 0.7 for a in ("clean", "fgsm", "pgd20")}
                                    for m in ("a", "b")}, [0, 1, 2], 10)
        out = summarise(study, "a", n_resamples=1000, seed=seed)
        called += any(cell["verdict"] != NO_DIFFERENCE for attack in ("clean", "fgsm", "pgd20")
                      for cell in _cells(out, "b", attack).values())
    assert called <= 3


def test_a_clear_difference_survives_holm():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 72)
    ref = {a: rng.random((3, 720)) < 0.5 for a in ("clean", "pgd20")}
    better = {a: v | (rng.random((3, 720)) < 0.5) for a, v in ref.items()}  # right wherever ref is, and more
    out = summarise(make_study(labels, {"ref": ref, "new": better}, [0, 1, 2], 10), "ref", n_resamples=2000)
    for attack in ref:
        cells = _cells(out, "new", attack)
        assert cells["average"]["verdict"] == "better" and cells["worst"]["verdict"] == "better"
        assert cells["average"]["diff_interval"][0] > 0 and cells["average"]["p_holm"] <= 0.05
        assert cells["nsd"]["diff"] < 0  # accuracies pushed up to ~0.75 from ~0.5: relatively tighter


def test_same_seed_gives_the_same_table_and_the_resample_is_shared_by_the_pair():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 30)
    runs = {m: {"clean": rng.random((3, 120)) < 0.6} for m in ("a", "b", "c")}
    study = make_study(labels, runs, [4, 5, 6], 4)
    assert summarise(study, "a", n_resamples=500, seed=9) == summarise(study, "a", n_resamples=500, seed=9)
    # c = b: the same resample for both sides makes c - a and b - a identical, sample for sample.
    same = make_study(labels, {"a": runs["a"], "b": runs["b"], "c": runs["b"]}, [4, 5, 6], 4)
    out = summarise(same, "a", n_resamples=500)
    assert _cells(out, "b", "clean") == _cells(out, "c", "clean")


def test_holm_by_hand():
    # Sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to the running maximum 0.06.
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.02, math.nan, 0.01])  # an undefined comparison is not counted
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    assert holm([]) == []


def test_interval_and_p_value_helpers():
    samples = np.arange(1, 101, dtype=float) / 100  # 0.01 .. 1.00
    low, high = basic_interval(0.5, samples, 0.9)
    assert (low, high) == pytest.approx((2 * 0.5 - np.percentile(samples, 95), 2 * 0.5 - np.percentile(samples, 5)))
    assert all(math.isnan(v) for v in basic_interval(math.nan, samples))
    # t = 0.3: samples >= 0.6 are 41 of 100, <= 0.6 are 60: p = 2 * 42 / 101.
    assert bootstrap_p(0.3, samples) == pytest.approx(2 * 42 / 101)
    assert bootstrap_p(0.0, np.zeros(10)) == 1.0 and math.isnan(bootstrap_p(0.1, np.full(5, np.nan)))


def test_metrics_from_counts_match_the_library_metrics():
    import torch

    from fastabsld.metrics import nsd, worst_class_accuracy

    counts, totals = np.array([[3, 0, 5, 2]]), np.array([4, 0, 10, 2])  # class 1 has no examples: skipped
    out = metrics_from_counts(counts, totals)
    per_class = torch.tensor([0.75, float("nan"), 0.5, 1.0], dtype=torch.float64)
    assert out["average"][0] == pytest.approx(10 / 16)
    assert out["worst"][0] == pytest.approx(float(worst_class_accuracy(per_class)))
    assert out["nsd"][0] == pytest.approx(float(nsd(per_class)))
    assert math.isnan(metrics_from_counts(np.zeros((1, 2)), np.array([3, 3]))["nsd"][0])  # every class at 0


def test_bad_inputs_are_named():
    labels = np.zeros(4, np.int64)
    good = {"a": {"clean": np.ones((2, 4), bool)}}
    with pytest.raises(ValueError, match="must not repeat a seed.*0 more than once"):
        make_study(labels, good, [0, 0], 1)
    with pytest.raises(ValueError, match="must not repeat"):
        check_seeds([1, 2, 1])
    with pytest.raises(ValueError, match="seeds must not be empty"):
        check_seeds([])
    with pytest.raises(ValueError, match=r"correct\['a'\]\['clean'\] must be a bool array of shape \(3 seeds"):
        make_study(labels, good, [0, 1, 2], 1)
    with pytest.raises(ValueError, match="same attacks"):
        make_study(labels, {**good, "b": {"fgsm": np.ones((2, 4), bool)}}, [0, 1], 1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        make_study(labels + 1, good, [0, 1], 1)
    study = make_study(labels, good, [0, 1], 1)
    with pytest.raises(ValueError, match="reference 'b'"):
        summarise(study, "b")
    with pytest.raises(ValueError, match="n_resamples"):
        summarise(study, "a", n_resamples=10)
