"""The study's hierarchical bootstrap: a compare table of 2 methods x 3 seeds x 4 attacks on 720 test images.

Group ``study-bootstrap``, 2000 resamples each:

- ``fastabsld``: :func:`fastabsld.study.statistics.summarise` (a multinomial over each class's distinct
  right/wrong patterns, one draw for every method of an attack);
- ``indices``: the same resampling written the plain way, drawing image indices within each class for every
  resample, seed slot and attack, then counting right answers per class (numpy, vectorised over resamples).

Target: ``fastabsld`` at least 2x faster than ``indices`` in the same run (10000 resamples, the default,
then take a few seconds on 2 cores).

Run: ``python -m pytest benchmarks/bench_study_bootstrap.py --benchmark-only --benchmark-columns=min,median,rounds``.
"""

import numpy as np
import pytest

from fastabsld.study.statistics import make_study, metrics_from_counts, summarise

RESAMPLES = 2000
ATTACKS = ("clean", "fgsm", "pgd20", "cw20")


def _study():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 72)
    skill = {"clean": 0.9, "fgsm": 0.6, "pgd20": 0.45, "cw20": 0.4}
    base = {a: rng.random((3, 720)) < skill[a] for a in ATTACKS}
    other = {a: np.where(rng.random((3, 720)) < 0.85, v, rng.random((3, 720)) < skill[a]) for a, v in base.items()}
    return make_study(labels, {"absld": base, "rslad": other}, [0, 1, 2], 10)


def _by_indices(study, resamples, seed=0):
    """Worst-class differences from explicit index resampling (the plain way), for timing."""
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, len(study.seeds), size=(resamples, len(study.seeds)))
    members = [np.flatnonzero(study.labels == k) for k in range(study.num_classes)]
    counts = study.class_counts
    out = {}
    for attack in study.attacks:
        per_method = {m: np.zeros((resamples, len(study.seeds), study.num_classes)) for m in study.methods}
        for slot in range(len(study.seeds)):
            for k, rows in enumerate(members):
                picked = rows[rng.integers(0, len(rows), size=(resamples, len(rows)))]  # (B, n_k)
                for m in study.methods:
                    right = study.correct[m][attack][seeds[:, slot, None], picked]
                    per_method[m][:, slot, k] = right.sum(axis=1)
        worst = {m: metrics_from_counts(v, counts)["worst"].mean(axis=1) for m, v in per_method.items()}
        out[attack] = worst["rslad"] - worst["absld"]
    return out


@pytest.mark.benchmark(group="study-bootstrap")
@pytest.mark.parametrize("variant", ["fastabsld", "indices"])
def test_bootstrap(benchmark, variant):
    study = _study()
    if variant == "fastabsld":
        result = benchmark(summarise, study, "absld", n_resamples=RESAMPLES)
        assert result["comparisons"] == 12
    else:
        result = benchmark(_by_indices, study, RESAMPLES)
        assert set(result) == set(ATTACKS)
