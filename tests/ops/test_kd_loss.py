"""torch.ops.fastabsld.kd_kl_div_forward (every backend) against fastabsld.reference.kd_kl_div."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def split(value, default=1.0):
    """A temperature or sample weight as the op's (tensor or None, scalar) pair."""
    if value is None:
        return None, default
    return (None, float(value)) if not isinstance(value, torch.Tensor) else (value, default)


def op_args(s, t, labels=None, tau_t=1.0, tau_s=1.0, ignore_index=-100, student_grad=True, teacher_grad=True,
            weight=None, sample_weight=None):
    """The op's 13 positional arguments from numbers or tensors."""
    tt, tts = split(tau_t)
    ts, tss = split(tau_s)
    sw, sws = split(sample_weight)
    return (s, t, labels, tt, ts, tts, tss, ignore_index, student_grad, teacher_grad, weight, sw, sws)


def expected(s, t, labels, tau_t, tau_s, ignore_index, weight, sample_weight, grad_weights):
    """Row losses and the gradients of sum_i g_i row_i, from the reference and autograd."""
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    rows = reference.kd_kl_div(s, t, labels, tau_t, tau_s, "none", ignore_index, weight, sample_weight)
    grad_s, grad_t = torch.autograd.grad((rows * grad_weights.to(rows.dtype)).sum(), (s, t))
    return rows.detach(), grad_s, grad_t


def check(backend, s, t, labels=None, tau_t=1.0, tau_s=1.0, ignore_index=-100, teacher_grad=True, weight=None,
          sample_weight=None):
    """Runs the op and compares its three outputs with the reference's."""
    grad_weights = torch.linspace(0.5, 2.0, s.shape[0]) if s.shape[0] > 1 else torch.tensor([1.5])
    args = op_args(s, t, labels, tau_t, tau_s, ignore_index, True, teacher_grad, weight, sample_weight)
    rows, grad_s, grad_t = run_backend(backend, *args)
    ref_rows, ref_s, ref_t = expected(s, t, labels, tau_t, tau_s, ignore_index, weight, sample_weight, grad_weights)
    loss_rtol, loss_atol, grad_rtol, grad_atol = max(TOLERANCES[s.dtype], TOLERANCES[t.dtype])
    assert rows.dtype == kd_loss.accumulation_dtype(s, t) and rows.shape == (s.shape[0],)
    torch.testing.assert_close(rows, ref_rows.to(rows.dtype), rtol=loss_rtol, atol=loss_atol)
    assert grad_s.dtype == s.dtype and grad_s.shape == s.shape and grad_s.is_contiguous()
    scale = max(ref_s.abs().max().item(), 1e-3)
    torch.testing.assert_close(grad_s.double() * grad_weights.double()[:, None], ref_s.double(),
                               rtol=grad_rtol, atol=grad_atol * scale)
    if teacher_grad:
        assert grad_t.dtype == t.dtype and grad_t.shape == t.shape
        scale = max(ref_t.abs().max().item(), 1e-3)
        torch.testing.assert_close(grad_t.double() * grad_weights.double()[:, None], ref_t.double(),
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


def row_temperatures(batch, seed=4):
    return 0.05 + 5 * torch.rand(batch, 1, generator=torch.Generator().manual_seed(seed))


def class_weights(num_classes, seed=6):
    """Per-class weights in [0, 2), one of them exactly 0."""
    weight = 2 * torch.rand(num_classes, generator=torch.Generator().manual_seed(seed))
    weight[0] = 0.0
    return weight


def sample_weights(batch, seed=7):
    return 2 * torch.rand(batch, generator=torch.Generator().manual_seed(seed))


def weights_of(kind, batch, num_classes, dtype=torch.float32):
    """(weight, sample_weight) for a weighting kind."""
    weight = class_weights(num_classes).to(dtype) if kind in ("class", "both") else None
    sample = {"sample": sample_weights(batch).to(dtype), "both": sample_weights(batch).to(dtype),
              "number": 0.7}.get(kind)
    return weight, sample


SHAPES = [(1, 1), (3, 2), (128, 10), (257, 100), (3, 1000), (2, 50257)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", ["unweighted", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_per_class_temperatures_match_reference(backend, dtype, shape, weighting):
    batch, num_classes = shape
    s, t = logits(batch, num_classes, dtype)
    ignored = [batch // 2] if batch > 2 else []
    labels = labels_for(batch, num_classes, ignored)
    weight, sample_weight = weights_of(weighting, batch, num_classes)
    check(backend, s, t, labels, class_temperatures(num_classes), 1.0, teacher_grad=dtype != torch.float16,
          weight=weight, sample_weight=sample_weight)


LABELLED_KINDS = ["per_class_both", "per_row_with_labels", "number_with_labels"]
UNLABELLED_KINDS = ["number", "per_row", "per_row_student", "expanded_row"]
KIND_WEIGHTINGS = [(k, w) for k in LABELLED_KINDS for w in ("unweighted", "class", "sample", "number", "both")] + \
    [(k, w) for k in UNLABELLED_KINDS for w in ("unweighted", "sample", "number")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,weighting", KIND_WEIGHTINGS, ids=[f"{k}-{w}" for k, w in KIND_WEIGHTINGS])
@pytest.mark.parametrize("shape", [(1, 10), (257, 10), (3, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_temperature_kinds_and_weights(backend, kind, weighting, shape):
    batch, num_classes = shape
    s, t = logits(batch, num_classes, seed=3)
    labels = labels_for(batch, num_classes, [batch - 1] if batch > 1 else []) if kind in LABELLED_KINDS else None
    weight, sample_weight = weights_of(weighting, batch, num_classes)
    tau_t, tau_s = {
        "number": (2.5, 0.7),
        "per_row": (row_temperatures(batch), 1.0),
        "per_row_student": (4.0, row_temperatures(batch)),
        "expanded_row": (torch.tensor([[1.7]]).expand(batch, 1), 0.8),  # stride 0
        "per_class_both": (class_temperatures(num_classes), class_temperatures(num_classes, seed=5)),
        "per_row_with_labels": (row_temperatures(batch), class_temperatures(num_classes)),
        "number_with_labels": (1.5, 0.9),
    }[kind]
    check(backend, s, t, labels, tau_t, tau_s, weight=weight, sample_weight=sample_weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", ["unweighted", "both"])
def test_fp64(backend, weighting):
    s, t = logits(5, 7, torch.float64)
    weight, sample_weight = weights_of(weighting, 5, 7, torch.float64)
    check(backend, s, t, labels_for(5, 7, [1]), class_temperatures(7).double(), 0.5, weight=weight,
          sample_weight=sample_weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", ["unweighted", "fp16_and_fp64"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                    (torch.float16, torch.bfloat16), (torch.float64, torch.float32)],
                         ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
def test_mixed_dtypes(backend, dtypes, weights):
    s, t = logits(9, 33)
    s, t = s.to(dtypes[0]), t.to(dtypes[1])
    weight = sample_weight = None
    if weights != "unweighted":
        weight, sample_weight = class_weights(33).half(), sample_weights(9).double()
    check(backend, s, t, labels_for(9, 33), 1.7, row_temperatures(9).to(dtypes[1]), weight=weight,
          sample_weight=sample_weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_ruled_out_classes_and_large_logits(backend, weighted):
    s, t = logits(6, 12, scale=1e4)
    t[0, :5] = -float("inf")  # classes ruled out by the teacher
    t[1, 3] = -float("inf")
    s[1, 3] = -float("inf")  # ruled out by both: 0 log 0 = 0, no NaN
    s[2, :] = 1e4
    t[3, :] = -1e4
    sample_weight = torch.tensor([0.0, 0.5, 2.0, 1.0, 0.0, 3.0]) if weighted else None
    rows, grad_s, grad_t = check(backend, s, t, None, 0.05, 1.0, sample_weight=sample_weight)
    assert torch.isfinite(rows).all() and torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()
    assert (grad_t[0, :5] == 0).all()
    if weighted:  # a zero weight gives a zero row and zero gradients
        assert rows[0] == 0 and (grad_s[0] == 0).all() and (grad_t[4] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "strided_columns", "row_slice"])
def test_non_contiguous_inputs_and_weights(backend, layout):
    s, t = logits(40, 64, seed=7)
    if layout == "transposed":
        s, t = s.t().contiguous().t(), t.t().contiguous().t()
    elif layout == "strided_columns":
        s, t = s[:, ::2], t[:, ::2]
    else:
        s, t = s[5:30], t[::2][:20][:, :]
        s = s[:20]
    assert not s.is_contiguous() or not t.is_contiguous()
    batch, num_classes = s.shape
    labels = labels_for(2 * batch, num_classes, [4])[::2]
    weight = class_weights(2 * num_classes)[1::2]
    sample_weight = sample_weights(3 * batch).reshape(batch, 3)[:, 1]
    tau_t = (torch.rand(batch, 3, generator=torch.Generator().manual_seed(8)) + 0.5)[:, 2:]  # a (B, 1) column view
    assert not (labels.is_contiguous() or weight.is_contiguous() or sample_weight.is_contiguous()
                or tau_t.is_contiguous())
    before = [x.clone() for x in (s, t, labels, weight, sample_weight, tau_t)]
    check(backend, s, t, labels, tau_t, class_temperatures(2 * num_classes)[1::2], weight=weight,
          sample_weight=sample_weight)
    check(backend, s, t, labels, class_temperatures(2 * num_classes)[::2], 1.3, weight=weight)
    for x, y in zip(before, (s, t, labels, weight, sample_weight, tau_t)):
        assert torch.equal(x, y)  # inputs untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_give_zero(backend):
    s, t = logits(4, 5)
    labels = torch.tensor([0, 2, 7, 1])
    args = op_args(s, t, labels, ignore_index=7, weight=torch.full((5,), 3.0), sample_weight=torch.ones(4))
    rows, grad_s, grad_t = run_backend(backend, *args)
    assert rows[2] == 0 and (grad_s[2] == 0).all() and (grad_t[2] == 0).all()
    assert rows[1] > 0 and (grad_s[1] != 0).any()


EMPTY_CASES = ["plain", "labels", "class_temperatures", "row_temperatures", "weights", "everything"]


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("case", EMPTY_CASES)
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_empty_batch(backend, case, teacher_grad):
    """B = 0 gives empty outputs on every backend, whatever arguments come with it."""
    s, t = logits(0, 5)
    labels = torch.zeros(0, dtype=torch.long) if case != "plain" and case != "row_temperatures" else None
    tau_t = {"class_temperatures": torch.ones(5), "everything": torch.ones(5),
             "row_temperatures": torch.ones(0, 1)}.get(case, 1.0)
    tau_s = torch.ones(0, 1) if case == "everything" else 1.0
    weight = torch.ones(5) if case in ("weights", "everything") else None
    sample_weight = torch.ones(0) if case in ("weights", "everything") else None
    rows, grad_s, grad_t = run_backend(backend, *op_args(s, t, labels, tau_t, tau_s, -100, True, teacher_grad,
                                                         weight, sample_weight))
    assert rows.shape == (0,) and rows.dtype == torch.float32 and grad_s.shape == (0, 5)
    assert grad_t.shape == ((0, 5) if teacher_grad else (0,))


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("case", ["label_high", "label_negative", "tau_zero", "tau_negative", "tau_nan", "tau_inf",
                                  "scalar_zero", "row_tau_zero", "weight_negative", "weight_nan", "weight_inf",
                                  "unused_weight_negative", "sample_weight_negative", "sample_weight_nan",
                                  "sample_weight_scalar_negative"])
def test_bad_values_raise(backend, case):
    if backend == "triton" and HAS_GPU:
        pytest.skip("on a GPU a bad value gives a NaN row, not an error (device asserts are opt-in); tests/cuda checks the NaN rows")
    s, t = logits(4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    tau = torch.ones(5)
    scalar = 1.0
    weighted = "weight" in case  # else unweighted: on the CUDA path the Triton launcher's own checks run
    weight, sample_weight, weight_scalar = (torch.ones(5), torch.ones(4), 1.0) if weighted else (None, None, 1.0)
    bad = {"zero": 0.0, "negative": -1.0, "nan": float("nan"), "inf": float("inf")}.get(case.rsplit("_", 1)[1])
    if case == "label_high":
        labels[2] = 5
    elif case == "label_negative":
        labels[2] = -1
    elif case == "scalar_zero":
        scalar = 0.0
    elif case == "row_tau_zero":
        tau = torch.ones(4, 1)
        tau[2] = 0.0
    elif case.startswith("tau"):
        tau[labels[1]] = bad
    elif case == "unused_weight_negative":
        weight[4] = -1.0  # no row has label 4: still a bad argument
        labels[3] = 0
    elif case.startswith("weight"):
        weight[labels[1]] = bad
    elif case == "sample_weight_scalar_negative":
        weight_scalar = -0.5
    else:
        sample_weight[1] = bad
    args = (s, t, labels, tau, None, 1.0, scalar, -100, True, False, weight, sample_weight, weight_scalar)
    if weighted:
        with pytest.raises(ValueError, match="weight.* must be non-negative and finite"):
            run_backend(backend, *args)
    else:
        with pytest.raises(RuntimeError, match="labels|temperature"):
            run_backend(backend, *args)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("case", ["class_temperature", "student_class_temperature", "weight"])
def test_per_class_arguments_need_labels(backend, case):
    """The op's shape rule: a (C,) temperature or weight without labels is an error, never per-row values."""
    s, t = logits(5, 5)  # B == C: a (C,) tensor could pass for a (B,) one
    args = list(op_args(s, t, None))
    if case == "class_temperature":
        args[3] = torch.ones(5)
    elif case == "student_class_temperature":
        args[4] = torch.ones(5)
    else:
        args[10] = torch.ones(5)
    with pytest.raises(RuntimeError, match="needs labels"):
        run_backend(backend, *args)


@pytest.mark.skipif(not HAS_EXTENSION, reason="fastabsld._C is not built")
def test_python_schema_matches_the_compiled_one():
    assert str(torch.ops.fastabsld.kd_kl_div_forward.default._schema) == "fastabsld::" + kd_loss.SCHEMA
    assert torch._C._dispatch_has_kernel_for_dispatch_key(kd_loss.OP, "CPU")


@pytest.mark.skipif(not HAS_EXTENSION, reason="fastabsld._C is not built")
@pytest.mark.parametrize("case", ["shape", "labels_dtype", "labels_shape", "tau_length", "int_logits", "row_tau_shape",
                                  "row_tau_3d", "weight_length", "weight_2d", "weight_int", "sample_weight_length",
                                  "sample_weight_int"])
def test_bad_arguments_raise_in_cpp(case):
    s, t = logits(4, 5)
    args = [s, t, torch.tensor([0, 1, 2, 3]), torch.ones(5), None, 1.0, 1.0, -100, True, False, None, None, 1.0]
    changes = {
        "shape": (1, t[:, :4]), "labels_dtype": (2, args[2].int()), "labels_shape": (2, args[2][:3]),
        "tau_length": (3, torch.ones(4)), "int_logits": (0, s.long()), "row_tau_shape": (3, torch.ones(4, 2)),
        "row_tau_3d": (3, torch.ones(4, 1, 1)), "weight_length": (10, torch.ones(4)),
        "weight_2d": (10, torch.ones(5, 1)), "weight_int": (10, torch.ones(5, dtype=torch.long)),
        "sample_weight_length": (11, torch.ones(5)), "sample_weight_int": (11, torch.ones(4, dtype=torch.long)),
    }
    index, value = changes[case]
    args[index] = value
    with pytest.raises(RuntimeError, match="kd_kl_div_forward"):
        torch.ops.fastabsld.kd_kl_div_forward(*args)


def test_cuda_dispatch_routes_to_the_triton_launcher_or_the_fallback(monkeypatch):
    """Calls reach the Triton launcher with its 13 arguments (per-row temperatures as (B,), the weights
    as given); fp64 and per-row temperatures with labels run the fallback."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(kd_loss.OP, "CUDA")
    calls = []

    def stand_in(*args):
        """The launcher's contract on the fallback: without labels a (B,) temperature is per row."""
        calls.append(args)
        args = list(args)
        if args[2] is None:
            args[3:5] = [None if tau is None else tau[:, None] for tau in args[3:5]]
        return kd_loss.fallback_forward(*args)

    monkeypatch.setattr(kd_loss, "triton_forward", lambda: stand_in)
    s, t = logits(3, 4)
    labels = torch.tensor([0, 3, 1])
    tau_rows = torch.tensor([[0.5], [1.0], [2.0]])
    kd_loss._cuda_forward(*op_args(s, t, None, tau_rows, 1.0))
    assert len(calls) == 1 and len(calls[0]) == 13 and calls[0][0] is s
    assert calls[0][10:] == (None, None, 1.0)
    assert calls[0][3].shape == (3,) and torch.equal(calls[0][3], tau_rows.reshape(3))
    kd_loss._cuda_forward(*op_args(s, t, labels, class_temperatures(4), 1.0))
    assert len(calls) == 2 and calls[1][3].shape == (4,)
    # The public function's 0-d temperature takes the launcher's forms too: (C,) with labels, (B,) without.
    for y, length in ((labels, 4), (None, 3)):
        tau, _ = kd_loss._check_temperature(torch.tensor(2.0), "teacher_temperature", y, (3,), 4, s.device,
                                            torch.float32)
        kd_loss._cuda_forward(*op_args(s, t, y, tau, 1.0))
        assert calls[-1][3].shape == (length,) and (calls[-1][3] == 2.0).all()
    assert len(calls) == 4
    weight, sample_weight = torch.ones(4), torch.ones(3)
    for args in (op_args(s, t, labels, weight=weight), op_args(s, t, None, sample_weight=sample_weight),
                 op_args(s, t, None, sample_weight=0.5)):
        kd_loss._cuda_forward(*args)
        assert len(calls[-1]) == 13 and all(a is b for a, b in zip(calls[-1][10:12], args[10:12]))
        assert calls[-1][12] == args[12]
    assert len(calls) == 7
    routed_to_fallback = [
        op_args(s, t, labels, tau_rows, 1.0),
        op_args(s, t, labels, tau_rows, 1.0, weight=weight, sample_weight=sample_weight),
        op_args(s.double(), t, None),
        op_args(s.double(), t, labels, weight=weight),
    ]
    for args in routed_to_fallback:
        rows, _, _ = kd_loss._cuda_forward(*args)
        torch.testing.assert_close(rows, reference.kd_kl_div(args[0], args[1], args[2], split_back(args[3], args[5]),
                                                             split_back(args[4], args[6]), "none", -100, args[10],
                                                             split_back(args[11], args[12])).to(rows.dtype))
    assert len(calls) == 7
    monkeypatch.setattr(kd_loss, "triton_forward", lambda: None)
    rows, _, _ = kd_loss._cuda_forward(*op_args(s, t))
    torch.testing.assert_close(rows, reference.kd_kl_div(s, t, reduction="none"))


def test_value_checks_without_triton():
    """The op layer imports without triton (the shared value checks are torch only) and still checks weights."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import triton raises ImportError, as where it is not installed
        import torch
        from fastabsld.ops import kd_loss
        assert not kd_loss.HAS_TRITON and kd_loss.triton_forward() is None
        s = torch.zeros(2, 3)
        try:
            kd_loss.fallback_forward(s, s, None, None, None, 1.0, 1.0, -100, True, False, None,
                                     torch.tensor([1.0, -1.0]), 1.0)
        except ValueError as error:
            assert "sample_weight must be non-negative and finite" in str(error), error
        else:
            raise AssertionError("a negative sample_weight passed")
        print("checks ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "checks ok" in result.stdout


def split_back(tensor, scalar):
    return scalar if tensor is None else tensor


@pytest.mark.parametrize("shape", [(5, 10), (3, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_launcher_through_the_cuda_path(shape):
    """The Triton kernel (interpreted on CPU tensors here) as the op's CUDA path uses it."""
    batch, num_classes = shape
    s, t = logits(batch, num_classes, seed=11)
    labels = labels_for(batch, num_classes, [1])
    check("triton", s, t, labels, class_temperatures(num_classes), 1.0)
    check("triton", s.bfloat16(), t, None, 0.5, torch.full((batch, 1), 2.0), teacher_grad=False)
    check("triton", s, t, labels, class_temperatures(num_classes), 1.0, weight=class_weights(num_classes),
          sample_weight=sample_weights(batch))
    check("triton", s.bfloat16(), t, None, torch.full((batch, 1), 2.0), 0.5, teacher_grad=False, sample_weight=0.3)
    # per-row temperatures with labels: the fallback
    check("triton", s, t, labels, class_temperatures(num_classes), row_temperatures(batch),
          weight=class_weights(num_classes), sample_weight=sample_weights(batch))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 9), num_classes=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       tau=st.floats(0.1, 10), per_row=st.booleans(), ignore=st.booleans(),
       weight_scale=st.sampled_from([0.0, 1e-3, 1.0, 1e3]), scale=st.sampled_from([0.1, 1.0, 10.0]),
       seed=st.integers(0, 2**16))
def test_property_weighted_rows_match_reference(batch, num_classes, dtype, tau, per_row, ignore, weight_scale, scale,
                                                seed):
    """Weighted rows and gradients of the C++ kernel and the fallback against the reference.

    Tolerances come from the logits' dtype: the kernels read the logits as given (the reference
    reads the same rounded values), so the remaining error is the accumulation's (fp32, fp64 for
    fp64): a few eps per operation, times the row's weight, the logits' scale over the temperature,
    and log C terms.
    """
    s, t = logits(batch, num_classes, dtype, scale=scale, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    if ignore:
        labels[0] = -100
    weight = weight_scale * torch.rand(num_classes, generator=gen)
    sample_weight = torch.rand(batch, generator=gen) + 0.5
    tau_t = tau * (0.5 + torch.rand(batch, 1, generator=gen)) if per_row else tau
    compute = kd_loss.accumulation_dtype(s, t)
    eps = torch.finfo(compute).eps
    tau_min = min(1.3, 0.5 * tau if per_row else tau)
    w_max = float(weight.max() * sample_weight.max())
    # Tempered logits up to ~4 scale / tau, log-sum-exp over C terms, cancellation in the KL.
    atol = 64 * eps * (1 + 4 * scale / tau_min) * (1 + math.log(num_classes)) * w_max
    ref_rows, ref_s, ref_t = expected(s, t, labels, tau_t, 1.3, -100, weight, sample_weight, torch.ones(batch))
    grad_eps = max(eps, torch.finfo(dtype).eps)  # the gradients are stored in the logits' dtype
    for backend in ("cpp", "fallback") if HAS_EXTENSION else ("fallback",):
        rows, grad_s, grad_t = run_backend(backend, *op_args(s, t, labels, tau_t, 1.3, -100, True, True, weight,
                                                             sample_weight))
        torch.testing.assert_close(rows, ref_rows.to(rows.dtype), rtol=64 * eps, atol=atol)
        for grad, ref in ((grad_s, ref_s), (grad_t, ref_t)):
            torch.testing.assert_close(grad.to(compute), ref.to(compute), rtol=2 * grad_eps,
                                       atol=2 * grad_eps * float(ref.abs().max()) + atol / tau_min)
