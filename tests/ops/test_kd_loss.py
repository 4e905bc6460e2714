"""torch.ops.fastabsld.kd_kl_div_forward (every backend) against fastabsld.reference.kd_kl_div."""

import pytest
import torch

from fastabsld import HAS_EXTENSION, reference
from fastabsld.ops import kd_loss
from tests.conftest import HAS_GPU, triton_device

BACKENDS = ["cpp", "fallback"]
TOLERANCES = {  # (loss rtol/atol, gradient rtol/atol relative to the gradient's max)
    torch.float32: (1e-5, 1e-5, 1e-4, 1e-6),
    torch.float64: (1e-10, 1e-10, 1e-9, 1e-12),
    torch.float16: (1e-4, 1e-4, 2e-3, 1e-3),
    torch.bfloat16: (1e-4, 1e-4, 1e-2, 8e-3),
}


def run_backend(backend, *args):
    if backend == "cpp":
        if not HAS_EXTENSION:
            pytest.skip("fastabsld._C is not built")
        return torch.ops.fastabsld.kd_kl_div_forward(*args)
    if backend == "triton":
        launcher = kd_loss.triton_forward()
        if launcher is None:
            pytest.skip("the Triton kernel is not importable")
        # CUDA tensors on a GPU machine, CPU tensors under the interpreter; results back on the CPU
        device = triton_device()
        moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        return tuple(out.cpu() for out in kd_loss._cuda_forward(*moved))
    return kd_loss.fallback_forward(*args)


def expected(s, t, labels, tau_t, tau_s, ignore_index, row_weights):
    """Row losses and the gradients of sum_i w_i row_i, from the reference and autograd."""
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    rows = reference.kd_kl_div(s, t, labels, tau_t, tau_s, "none", ignore_index)
    grad_s, grad_t = torch.autograd.grad((rows * row_weights.to(rows.dtype)).sum(), (s, t))
    return rows.detach(), grad_s, grad_t


def split(tau):
    return (None, float(tau)) if not isinstance(tau, torch.Tensor) else (tau, 1.0)


def check(backend, s, t, labels=None, tau_t=1.0, tau_s=1.0, ignore_index=-100, teacher_grad=True):
    """Runs the op and compares its three outputs with the reference's."""
    weights = torch.linspace(0.5, 2.0, s.shape[0]) if s.shape[0] > 1 else torch.tensor([1.5])
    tt, tts = split(tau_t)
    ts, tss = split(tau_s)
    rows, grad_s, grad_t = run_backend(backend, s, t, labels, tt, ts, tts, tss, ignore_index, True, teacher_grad)
    ref_rows, ref_s, ref_t = expected(s, t, labels, tau_t, tau_s, ignore_index, weights)
    loss_rtol, loss_atol, grad_rtol, grad_atol = max(TOLERANCES[s.dtype], TOLERANCES[t.dtype])
    assert rows.dtype == kd_loss.accumulation_dtype(s, t) and rows.shape == (s.shape[0],)
    torch.testing.assert_close(rows, ref_rows.to(rows.dtype), rtol=loss_rtol, atol=loss_atol)
    assert grad_s.dtype == s.dtype and grad_s.shape == s.shape and grad_s.is_contiguous()
    scale = max(ref_s.abs().max().item(), 1e-3)
    torch.testing.assert_close(grad_s.double() * weights.double()[:, None], ref_s.double(),
                               rtol=grad_rtol, atol=grad_atol * scale)
    if teacher_grad:
        assert grad_t.dtype == t.dtype and grad_t.shape == t.shape
        scale = max(ref_t.abs().max().item(), 1e-3)
        torch.testing.assert_close(grad_t.double() * weights.double()[:, None], ref_t.double(),
                                   rtol=grad_rtol, atol=grad_atol * scale)
    else:
        assert grad_t.shape == (0,)
    return rows, grad_s, grad_t


def logits(batch, num_classes, dtype=torch.float32, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(batch, num_classes, generator=gen)).to(dtype)
    t = (scale * torch.randn(batch, num_classes, generator=gen)).to(dtype)
    return s, t


def labels_for(batch, num_classes, ignored=(), seed=1):
    labels = torch.randint(0, num_classes, (batch,), generator=torch.Generator().manual_seed(seed))
    for i in ignored:
        labels[i] = -100
    return labels


def class_temperatures(num_classes, seed=2):
    return 0.3 + 3 * torch.rand(num_classes, generator=torch.Generator().manual_seed(seed))


SHAPES = [(1, 1), (3, 2), (128, 10), (257, 100), (3, 1000), (2, 50257)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_per_class_temperatures_match_reference(backend, dtype, shape):
    batch, num_classes = shape
    s, t = logits(batch, num_classes, dtype)
    ignored = [batch // 2] if batch > 2 else []
    labels = labels_for(batch, num_classes, ignored)
    check(backend, s, t, labels, class_temperatures(num_classes), 1.0, teacher_grad=dtype != torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["number", "per_row", "per_class_both", "per_row_student"])
@pytest.mark.parametrize("shape", [(1, 10), (257, 10), (3, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_temperature_kinds(backend, kind, shape):
    batch, num_classes = shape
    s, t = logits(batch, num_classes, seed=3)
    rows_tau = 0.05 + 5 * torch.rand(batch, generator=torch.Generator().manual_seed(4))
    if kind == "number":
        check(backend, s, t, None, 2.5, 0.7)
    elif kind == "per_row":
        check(backend, s, t, None, rows_tau, 1.0)
    elif kind == "per_row_student":
        check(backend, s, t, None, 4.0, rows_tau)
    else:
        labels = labels_for(batch, num_classes)
        check(backend, s, t, labels, class_temperatures(num_classes), class_temperatures(num_classes, seed=5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64(backend):
    s, t = logits(5, 7, torch.float64)
    check(backend, s, t, labels_for(5, 7, [1]), class_temperatures(7).double(), 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                    (torch.float16, torch.bfloat16), (torch.float64, torch.float32)],
                         ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
def test_mixed_dtypes(backend, dtypes):
    s, t = logits(9, 33)
    s, t = s.to(dtypes[0]), t.to(dtypes[1])
    check(backend, s, t, None, 1.7, 0.9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ruled_out_classes_and_large_logits(backend):
    s, t = logits(6, 12, scale=1e4)
    t[0, :5] = -float("inf")  # classes ruled out by the teacher
    t[1, 3] = -float("inf")
    s[1, 3] = -float("inf")  # ruled out by both: 0 log 0 = 0, no NaN
    s[2, :] = 1e4
    t[3, :] = -1e4
    rows, grad_s, grad_t = check(backend, s, t, None, 0.05, 1.0)
    assert torch.isfinite(rows).all() and torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()
    assert (grad_t[0, :5] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "strided_columns", "row_slice"])
def test_non_contiguous_inputs(backend, layout):
    s, t = logits(40, 64, seed=7)
    if layout == "transposed":
        s, t = s.t().contiguous().t(), t.t().contiguous().t()
    elif layout == "strided_columns":
        s, t = s[:, ::2], t[:, ::2]
    else:
        s, t = s[5:30], t[::2][:20][:, :]
        s = s[:20]
    assert not s.is_contiguous() or not t.is_contiguous()
    labels = labels_for(s.shape[0], s.shape[1], [3])
    before = s.clone(), t.clone()
    check(backend, s, t, labels, class_temperatures(s.shape[1]), 1.3)
    assert torch.equal(s, before[0]) and torch.equal(t, before[1])  # inputs untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_give_zero(backend):
    s, t = logits(4, 5)
    labels = torch.tensor([0, 2, 7, 1])
    rows, grad_s, grad_t = run_backend(backend, s, t, labels, None, None, 1.0, 1.0, 7, True, True)
    assert rows[2] == 0 and (grad_s[2] == 0).all() and (grad_t[2] == 0).all()
    assert rows[1] > 0 and (grad_s[1] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    s, t = logits(0, 5)
    rows, grad_s, grad_t = run_backend(backend, s, t, None, None, None, 1.0, 1.0, -100, True, False)
    assert rows.shape == (0,) and grad_s.shape == (0, 5) and grad_t.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("case", ["label_high", "label_negative", "tau_zero", "tau_negative", "tau_nan", "tau_inf",
                                  "scalar_zero"])
def test_bad_values_raise(backend, case):
    if backend == "triton" and HAS_GPU:
        pytest.skip("on a GPU these are device asserts, which end the CUDA context")
    s, t = logits(4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    tau = torch.ones(5)
    scalar = 1.0
    if case == "label_high":
        labels[2] = 5
    elif case == "label_negative":
        labels[2] = -1
    elif case == "scalar_zero":
        scalar = 0.0
    else:
        tau[labels[1]] = {"tau_zero": 0.0, "tau_negative": -1.0, "tau_nan": float("nan"),
                          "tau_inf": float("inf")}[case]
    with pytest.raises(RuntimeError, match="labels|temperature"):
        run_backend(backend, s, t, labels, tau, None, 1.0, scalar, -100, True, False)


@pytest.mark.skipif(not HAS_EXTENSION, reason="fastabsld._C is not built")
def test_python_schema_matches_the_compiled_one():
    assert str(torch.ops.fastabsld.kd_kl_div_forward.default._schema) == "fastabsld::" + kd_loss.SCHEMA
    assert torch._C._dispatch_has_kernel_for_dispatch_key(kd_loss.OP, "CPU")


@pytest.mark.skipif(not HAS_EXTENSION, reason="fastabsld._C is not built")
@pytest.mark.parametrize("case", ["shape", "labels_dtype", "labels_shape", "tau_length", "int_logits"])
def test_bad_arguments_raise_in_cpp(case):
    s, t = logits(4, 5)
    args = [s, t, torch.tensor([0, 1, 2, 3]), torch.ones(5), None, 1.0, 1.0, -100, True, False]
    if case == "shape":
        args[1] = t[:, :4]
    elif case == "labels_dtype":
        args[2] = args[2].int()
    elif case == "labels_shape":
        args[2] = args[2][:3]
    elif case == "tau_length":
        args[3] = torch.ones(4)
    else:
        args[0] = s.long()
    with pytest.raises(RuntimeError, match="kd_kl_div_forward"):
        torch.ops.fastabsld.kd_kl_div_forward(*args)


def test_cuda_registration_uses_the_triton_launcher(monkeypatch):
    """The CUDA implementation calls the Triton launcher when importable, else the reference."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(kd_loss.OP, "CUDA")
    calls = []

    def stand_in(*args):
        calls.append(args)
        return kd_loss.fallback_forward(*args)

    s, t = logits(3, 4)
    args = (s, t, None, None, None, 1.0, 1.0, -100, True, False)
    monkeypatch.setattr(kd_loss, "triton_forward", lambda: stand_in)
    kd_loss._cuda_forward(*args)
    assert len(calls) == 1 and calls[0][0] is s
    monkeypatch.setattr(kd_loss, "triton_forward", lambda: None)
    rows, _, _ = kd_loss._cuda_forward(*args)
    torch.testing.assert_close(rows, reference.kd_kl_div(s, t, reduction="none"))


@pytest.mark.parametrize("shape", [(5, 10), (3, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_launcher_through_the_cuda_path(shape):
    """The Triton kernel (interpreted on CPU tensors here) as the op's CUDA path uses it."""
    batch, num_classes = shape
    s, t = logits(batch, num_classes, seed=11)
    labels = labels_for(batch, num_classes, [1])
    check("triton", s, t, labels, class_temperatures(num_classes), 1.0)
    check("triton", s.bfloat16(), t, None, 0.5, torch.full((batch,), 2.0), teacher_grad=False)
