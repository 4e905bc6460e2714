"""fastabsld.ops.pgd_step against the reference."""

import pytest
import torch

from fastabsld import reference
from fastabsld.ops import pgd_step


@pytest.mark.parametrize("shape", [(1, 7), (3, 3, 5, 5), (129, 3, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linf_step_matches_reference(device, shape, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=gen).to(device, dtype)
    x_adv = (x + 0.03 * torch.randn(shape, generator=gen).to(device, dtype)).clamp(0, 1)
    grad = torch.randn(shape, generator=gen).to(device, dtype)
    grad.view(-1)[::5] = 0
    out = pgd_step(x_adv, x, grad, alpha=2 / 255, eps=8 / 255)
    expected = reference.pgd_step(x_adv, x, grad, 2 / 255, 8 / 255)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
