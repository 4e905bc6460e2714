"""The speed helpers of the step: fp32 logits under autocast."""

import torch
from torch import nn

from fastabsld.recipe import speed


def test_forward_fp32_autocasts_and_returns_fp32():
    model = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x).float()
    out = speed.forward_fp32(model, x, amp=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(speed.forward_fp32(model, x, amp=False), model(x))
