"""The anti-bias temperature update against a transcription of the released formula."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastabsld.temperature import (
    accumulate_class_risk,
    anti_bias_update,
    check_beta,
    check_temperature_bounds,
)
from tests.released import released_temperature_update


def test_several_epochs_match_released_formula():
    gen = torch.Generator().manual_seed(0)
    ours = released = torch.ones(10)
    beta = 0.1
    for epoch in range(12):
        risk = torch.rand(10, generator=gen) * 300 + 50
        if epoch == 8:
            beta *= 0.1  # the recipe's LR milestone
        ours = anti_bias_update(ours, risk, beta)
        released = released_temperature_update(released, risk, beta)
        torch.testing.assert_close(ours, released, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, torch.ones(10))  # the update did move the temperatures


def test_hard_class_gets_sharper_labels():
    risk = torch.tensor([1.0, 2.0, 9.0])
    tau = anti_bias_update(torch.ones(3), risk, 0.1)
    # g = [-3, -2, 5], max|g| = 5: the riskiest class moves by exactly -beta.
    torch.testing.assert_close(tau, torch.tensor([1 + 0.06, 1 + 0.04, 0.9]))


def test_tie_leaves_tau_unchanged_where_released_gives_nan():
    tau = torch.tensor([0.7, 1.3, 2.0, 4.5])
    for risk in (torch.full((4,), 3.25), torch.zeros(4)):
        assert torch.isnan(released_temperature_update(tau, risk, 0.1)).all()
        assert torch.equal(anti_bias_update(tau, risk, 0.1), tau)


def test_non_finite_risk_leaves_tau_unchanged():
    tau = torch.tensor([0.7, 1.3, 2.0])
    for bad in (float("nan"), float("inf")):
        assert torch.equal(anti_bias_update(tau, torch.tensor([1.0, bad, 2.0]), 0.1), tau)


def test_both_clamps_over_epochs():
    risk = torch.tensor([10.0, 0.0, 5.0, 5.0])
    ours = released = torch.ones(4)
    for _ in range(30):
        ours = anti_bias_update(ours, risk, 0.5, tau_min=0.5, tau_max=5.0)
        released = released_temperature_update(released, risk, 0.5, 0.5, 5.0)
        torch.testing.assert_close(ours, released, rtol=0, atol=1e-6)
    assert ours[0] == 0.5 and ours[1] == 5.0
    assert ours[2] == ours[3] == 1.0  # zero gap: untouched


def test_custom_bounds_and_tensor_beta():
    tau = torch.tensor([1.0, 1.0])
    out = anti_bias_update(tau, torch.tensor([0.0, 1.0]), torch.tensor(0.3), tau_min=0.8, tau_max=1.1)
    torch.testing.assert_close(out, torch.tensor([1.1, 0.8]))


def test_dtype_device_and_new_tensor():
    tau = torch.ones(5, dtype=torch.float64)
    risk = torch.arange(5, dtype=torch.float32)
    out = anti_bias_update(tau, risk, 0.1)
    assert out.dtype == torch.float64 and out.data_ptr() != tau.data_ptr()
    torch.testing.assert_close(out, released_temperature_update(tau, risk.double(), 0.1))
    assert torch.equal(tau, torch.ones(5, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1e4, allow_nan=False, width=32), min_size=1, max_size=12),
       st.floats(0, 2), st.integers(0, 2 ** 31 - 1))
def test_matches_released_on_random_risks(risk, beta, seed):
    risk = torch.tensor(risk)
    tau = 0.5 + 4.5 * torch.rand(risk.shape, generator=torch.Generator().manual_seed(seed))
    ours = anti_bias_update(tau, risk, beta)
    released = released_temperature_update(tau, risk, beta)
    if torch.isnan(released).any():
        assert torch.equal(ours, tau)
    else:
        torch.testing.assert_close(ours, released, rtol=0, atol=1e-5)
    assert ((ours >= 0.5) & (ours <= 5.0)).all()


def test_traces_without_host_sync():
    # fullgraph tracing fails on .item(), bool(tensor) and other data-dependent Python control flow.
    compiled = torch.compile(anti_bias_update, backend="eager", fullgraph=True)
    tau, risk = torch.ones(4), torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(compiled(tau, risk, 0.1), anti_bias_update(tau, risk, 0.1))
    assert torch.equal(compiled(tau, torch.ones(4), 0.1), tau)


@pytest.mark.cuda
def test_no_sync_on_cuda():
    tau, risk = torch.ones(10, device="cuda"), torch.rand(10, device="cuda")
    logits, labels = torch.randn(8, 10, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        anti_bias_update(tau, risk, 0.1)
        accumulate_class_risk(torch.zeros(10, device="cuda"), logits, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_accumulate_class_risk_against_loop():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 4, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 2, 2, 1, 0, 2, 0, 0, 2])
    risk = torch.full((4,), 0.5)
    assert accumulate_class_risk(risk, logits, labels) is risk
    expected = [0.5] * 4
    for row, label in zip(logits, labels.tolist()):
        expected[label] += F.cross_entropy(row[None], torch.tensor([label])).item()
    torch.testing.assert_close(risk, torch.tensor(expected))
    assert not risk.requires_grad


def test_argument_errors():
    with pytest.raises(ValueError, match="shape"):
        anti_bias_update(torch.ones(3), torch.ones(4), 0.1)
    with pytest.raises(ValueError, match="shape"):
        anti_bias_update(torch.ones(2, 2), torch.ones(2, 2), 0.1)
    with pytest.raises(ValueError, match="tau_min"):
        anti_bias_update(torch.ones(3), torch.ones(3), 0.1, tau_min=2.0, tau_max=1.0)
    with pytest.raises(ValueError, match="tau_min"):
        check_temperature_bounds(0.0, 5.0)
    with pytest.raises(ValueError, match="tau_init"):
        check_temperature_bounds(0.5, 5.0, 6.0)
    with pytest.raises(ValueError, match="tau_max"):
        check_temperature_bounds(0.5, math.inf)
    with pytest.raises(ValueError, match="beta"):
        check_beta(-0.1)
    with pytest.raises(ValueError, match="beta"):
        check_beta(float("nan"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64])
def test_accumulate_class_risk_refuses_a_16_bit_or_integer_accumulator(dtype):
    with pytest.raises(ValueError, match="risk must be an fp32 or fp64 tensor"):
        accumulate_class_risk(torch.zeros(3, dtype=dtype), torch.zeros(2, 3), torch.tensor([0, 1]))
