"""The study's plot draws the table's intervals, and attack titles carry their steps."""

import numpy as np
import pytest

from fastabsld.recipe import report as run_report
from fastabsld.study import report as study_report
from fastabsld.study import statistics


def test_plot_draws_the_tables_intervals(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    study = statistics.make_study(labels, {m: {a: rng.random((3, 60)) < p for a in ("clean", "pgd20")}
                                           for m, p in (("absld", 0.6), ("rslad", 0.4))}, [0, 1, 2], 3)
    summary = statistics.summarise(study, "absld", n_resamples=500)["summary"]
    seen = {}
    save = run_report.save_figure

    def keeping(fig, path, caption=None):
        seen.update(fig=fig, caption=caption)
        return save(fig, path, caption)

    monkeypatch.setattr(run_report, "save_figure", keeping)
    path = study_report.plot_comparison(summary, ["clean", "pgd20"], str(tmp_path / "c.png"), "t", seeds=3)
    assert (tmp_path / "c.png").stat().st_size > 0 and path == str(tmp_path / "c.png")
    assert seen["caption"].startswith("lines: 95% intervals (hierarchical bootstrap over 3 seeds")
    for ax, key in zip(seen["fig"].axes, ("average", "worst", "nsd")):
        drawn = sorted((round(float(s[0][1]), 9), round(float(s[1][1]), 9))
                       for collection in ax.collections if hasattr(collection, "get_segments")
                       for s in collection.get_segments())
        wanted = sorted((round(summary[m][a][key]["interval"][0], 9), round(summary[m][a][key]["interval"][1], 9))
                        for m in ("absld", "rslad") for a in ("clean", "pgd20"))
        assert drawn == wanted, key
        assert [t.get_text() for t in ax.get_xticklabels()] == ["clean", "PGD-20"]


@pytest.mark.parametrize("name, title", [("pgd20", "PGD-20"), ("cw30", "CW-30"), ("fgsm", "FGSM"),
                                         ("autoattack", "AutoAttack"), ("clean", "clean")])
def test_attack_titles(name, title):
    assert study_report.attack_title(name) == title
