"""Per-class accuracy, worst class and NSD on hand-computed cases and against scikit-learn."""

import json
import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import confusion_matrix

from fastabsld.metrics import (
    ClassAccuracy,
    class_counts,
    nsd,
    per_class_accuracy,
    predicted_classes,
    worst_class_accuracy,
)

NAN = float("nan")

# Class 0: 1 of 2 right; class 1: 2 of 3; class 2: 1 of 1; class 3: no samples.
LABELS = torch.tensor([0, 0, 1, 1, 1, 2])
PREDICTIONS = torch.tensor([0, 1, 1, 1, 0, 2])
EXPECTED = [0.5, 2 / 3, 1.0, NAN]


def as_logits(predictions, classes):
    return torch.nn.functional.one_hot(predictions, classes).float() * 3 - 1


def assert_same(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nonfinite_logits_predict_no_class_and_count_as_wrong(dtype):
    logits = as_logits(LABELS, 4).to(dtype)  # every row right...
    logits[0, 1] = NAN        # ...but a NaN row (argmax would say class 0 or 1)
    logits[2, 0] = math.inf   # an infinite row (argmax: class 0, wrong anyway)
    logits[3, 3] = -math.inf  # -inf too: a row that is not finite has no answer
    assert predicted_classes(logits).tolist() == [-1, 0, -1, -1, 1, 2]
    # Class 0: 1 of 2 right (row 0 no longer counts); class 1: 1 of 3; class 2: 1 of 1.
    assert_same(per_class_accuracy(logits, LABELS, 4), [0.5, 1 / 3, 1.0, NAN])
    meter = ClassAccuracy(4)
    meter.update(logits, LABELS)
    assert meter.summary()["average"] == pytest.approx(3 / 6)
    # Integer "logits" (votes) are finite by construction.
    assert predicted_classes(torch.tensor([[0, 2], [3, 1]])).tolist() == [1, 0]
    with pytest.raises(ValueError, match="logits must be a"):
        predicted_classes(torch.zeros(3))


def test_per_class_accuracy_hand_computed():
    assert_same(per_class_accuracy(PREDICTIONS, LABELS, 4), EXPECTED)
    assert_same(per_class_accuracy(as_logits(PREDICTIONS, 4), LABELS, 4), EXPECTED)


def test_worst_and_nsd_skip_empty_classes():
    acc = per_class_accuracy(PREDICTIONS, LABELS, 4)
    assert worst_class_accuracy(acc).item() == 0.5
    present = [0.5, 2 / 3, 1.0]
    assert nsd(acc).item() == pytest.approx(statistics.pstdev(present) / statistics.mean(present), rel=1e-12)


def test_nsd_edge_cases():
    assert nsd(torch.tensor([0.8, 0.8, 0.8], dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-15)
    assert math.isnan(nsd(torch.zeros(3, dtype=torch.float64)).item())
    all_empty = torch.full((3,), NAN, dtype=torch.float64)
    assert math.isnan(nsd(all_empty).item()) and math.isnan(worst_class_accuracy(all_empty).item())
    assert nsd(torch.tensor([0.2, 0.6])).item() == pytest.approx(0.5)  # std 0.2, mean 0.4


def test_empty_batch():
    acc = per_class_accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 2)
    assert torch.isnan(acc).all()


@pytest.mark.filterwarnings("ignore:A single label was found")  # sklearn warns even with labels=
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 60), st.integers(0, 2 ** 31 - 1))
def test_against_sklearn_confusion_matrix(classes, size, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (size,), generator=gen)
    logits = torch.randn(size, classes, generator=gen)
    matrix = confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), labels=list(range(classes)))
    rows = matrix.sum(axis=1)
    expected = [matrix[k, k] / rows[k] if rows[k] else NAN for k in range(classes)]
    acc = per_class_accuracy(logits, labels, classes)
    assert_same(acc, expected)
    present = [value for value in expected if not math.isnan(value)]
    if present:
        assert worst_class_accuracy(acc).item() == pytest.approx(min(present))
        if statistics.mean(present) > 0:
            assert nsd(acc).item() == pytest.approx(statistics.pstdev(present) / statistics.mean(present),
                                                    rel=1e-9, abs=1e-12)


def test_streaming_accumulator():
    meter = ClassAccuracy(4)
    meter.update(PREDICTIONS[:4], LABELS[:4])
    meter.update(as_logits(PREDICTIONS[4:], 4), LABELS[4:])
    assert_same(meter.per_class(), EXPECTED)
    assert meter.accuracy().item() == pytest.approx(4 / 6)
    summary = meter.summary()
    assert json.loads(json.dumps(summary))["count"] == 6
    assert all(type(value) is float for value in summary["per_class"] + [summary["average"], summary["nsd"]])
    assert summary["per_class"][:3] == pytest.approx(EXPECTED[:3]) and math.isnan(summary["per_class"][3])
    assert summary["worst"] == 0.5 and summary["count"] == 6
    assert summary["average"] == pytest.approx(4 / 6)
    empty = ClassAccuracy(4).summary()
    assert empty["count"] == 0 and math.isnan(empty["average"]) and math.isnan(empty["worst"])


def test_argument_errors():
    with pytest.raises(ValueError, match="batch size"):
        per_class_accuracy(PREDICTIONS[:3], LABELS, 4)
    with pytest.raises(ValueError, match="predictions"):
        per_class_accuracy(torch.zeros(6, 2, 2), LABELS, 4)
    with pytest.raises(ValueError, match="labels"):
        per_class_accuracy(PREDICTIONS, LABELS[:, None], 4)
    for bad in (-1, 4):  # out of [0, num_classes): not an IndexError, nor a count for the wrong class
        with pytest.raises(ValueError, match="labels"):
            per_class_accuracy(PREDICTIONS, torch.cat([LABELS[:-1], torch.tensor([bad])]), 4)
    with pytest.raises(ValueError, match="num_classes"):
        ClassAccuracy(0)
    with pytest.raises(ValueError, match="per_class_acc"):
        nsd(torch.zeros(2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_labels_are_refused(dtype):
    # 3.7 would otherwise count as class 3 and True as class 1.
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        class_counts(PREDICTIONS, LABELS.to(dtype), 4)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        ClassAccuracy(4).update(PREDICTIONS, LABELS.to(dtype))


def test_non_integer_predictions_are_refused():
    with pytest.raises(ValueError, match="predictions of shape \\(B,\\) must be integer"):
        class_counts(PREDICTIONS.float() + 0.4, LABELS, 4)
    with pytest.raises(ValueError, match="predictions_or_logits must be a tensor"):
        class_counts(PREDICTIONS.tolist(), LABELS, 4)


@pytest.mark.cuda
def test_no_sync_on_cuda():
    meter = ClassAccuracy(4, device="cuda")
    logits, labels = as_logits(PREDICTIONS, 4).cuda(), LABELS.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meter.update(logits, labels)
        acc = per_class_accuracy(logits, labels, 4)
        worst_class_accuracy(acc), nsd(acc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same(acc.cpu(), EXPECTED)
