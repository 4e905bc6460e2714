"""Precision of the fp16 student gradient at C = 32000 against fp64: stored in fp16 by the forward
and then scaled (the op ``kd_kl_div_forward``'s gradient, as the eager path kept it before), or
kept in fp32 until grad_output has scaled it (the eager CUDA path, ``fastabsld.ops.kd_loss_triton``).

Runs the Triton kernels in the interpreter on CPU tensors (it sets TRITON_INTERPRET=1 before they
are imported), 4 rows of 2 * N(0, 1) logits; prints the 90th-percentile relative error and the
share of entries flushed to 0 for a "sum" loss with grad_output 1024 (a loss scaler's factor) and
1, and a "mean" loss with grad_output 65536:

    python -m benchmarks.kd_fp16_gradient

Keeping the gradient in fp32 helps where grad_output scales it into fp16's normal range; where
the final gradient itself lies below it ("mean" over many elements, or grad_output 1), the fp16
result's own range is the limit either way.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from fastabsld import reference  # noqa: E402
from fastabsld.loss import kd_kl_div  # noqa: E402
from fastabsld.ops import kd_loss, kd_loss_triton  # noqa: E402

CASES = (("sum", 2.0 ** 10), ("sum", 1.0), ("mean", 2.0 ** 16))


def main(rows=4, num_classes=32000):
    """Prints the comparison.

    Args:
        rows: B.
        num_classes: C.
    """
    gen = torch.Generator().manual_seed(0)
    s = (2 * torch.randn(rows, num_classes, generator=gen)).half()
    t = (2 * torch.randn(rows, num_classes, generator=gen)).half()
    _, stored, _ = kd_loss._cuda_forward(s, t, None, None, None, 1.0, 1.0, -100, True, False)
    print(f"stored fp16 entries below fp16's smallest normal: {(stored.float().abs() < 2 ** -14).float().mean():.1%}")
    kd_loss_triton.EAGER_DEVICES.add("cpu")
    for reduction, scale in CASES:
        s64 = s.double().requires_grad_(True)
        (ref,) = torch.autograd.grad(reference.kd_kl_div(s64, t.double(), reduction=reduction) * scale, s64)
        factor = scale / (stored.numel() if reduction == "mean" else 1)
        before = (stored.float() * factor).half()  # g * (grad_output / denominator), rounded once
        student = s.clone().requires_grad_(True)
        (after,) = torch.autograd.grad(kd_kl_div(student, t, reduction=reduction), student, torch.tensor(scale))
        for name, grad in (("stored fp16", before), ("kept fp32", after)):
            relative = ((grad.double() - ref).abs() / ref.abs().clamp_min(1e-300)).flatten()
            flushed = ((grad == 0) & (ref != 0)).double().mean().item()
            print(f"{reduction:>4} grad_output {scale:>6g} {name:>11}: p90 relative error "
                  f"{torch.quantile(relative, 0.9).item():.3g}, flushed to 0 {flushed:.3%}")


if __name__ == "__main__":
    main()
