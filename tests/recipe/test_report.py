"""The run folder's metrics.json."""

import json
import os

import pytest

from fastabsld.recipe import report


class _Exploding:
    """Pickles part-way, then fails (a full disk or a kill during the write)."""

    def __reduce__(self):
        raise OSError("disk full")


def test_atomic_write_text_failure(tmp_path):
    path = tmp_path / "metrics.json"
    report.write_metrics(str(tmp_path), {"a": 1})
    with pytest.raises(TypeError):
        report.write_metrics(str(tmp_path), {"a": object()})
    assert os.listdir(tmp_path) == ["metrics.json"] and json.loads(path.read_text()) == {"a": 1}
    report.write_metrics(str(tmp_path), {"a": float("inf"), "b": [float("nan"), 1.0]})
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.0]}
