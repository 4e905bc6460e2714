"""The Triton KD forward (kernels/kd_kl_div.py) against fastabsld.reference.kd_kl_div.

Runs on CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
without a GPU), and compiles every kernel variant for sm_80 and sm_90.
"""

import math

import pytest
import torch
from fastabsld.kernels import kd_kl_div as kd
from hypothesis import given, settings
from hypothesis import strategies as st

from fastabsld import reference
from tests.conftest import HAS_GPU, triton_device
from tests.triton_aot import compile_many_for_gpus

DEVICE = triton_device()
IGNORE = -100


def make_logits(batch, num_classes, dtype, layout="contiguous", scale=3.0, generator=None):
    """(B, C) random logits in ``dtype`` and the given memory layout."""
    shape = {"transposed": (num_classes, batch), "column-slice": (batch, 2 * num_classes),
             "row-slice": (2 * batch, num_classes)}.get(layout, (batch, num_classes))
    base = (torch.randn(shape, generator=generator) * scale).to(dtype).to(DEVICE)
    if layout == "transposed":
        return base.t()
    if layout == "column-slice":
        return base[:, 1::2]
    if layout == "row-slice":
        return base[::2]
    return base


def temperatures(kind, batch, num_classes, low=0.5, high=3.0, generator=None):
    """(labels, teacher tensor or None, student tensor or None, teacher scalar, student scalar)."""
    def draw(n):
        return (low + (high - low) * torch.rand(n, generator=generator)).to(DEVICE)

    labels = torch.randint(0, num_classes, (2 * batch,), generator=generator).to(DEVICE)[::2]  # strided
    if kind == "scalar":
        return None, None, None, 2.0, 0.7
    if kind == "scalar-labels":
        return labels, None, None, 1.5, 1.0
    if kind == "class":
        return labels, draw(num_classes), None, 1.0, 1.3
    if kind == "class-both":
        return labels, draw(num_classes), draw(num_classes), 1.0, 1.0
    if kind == "row":
        return None, draw(batch), draw(batch), 1.0, 1.0
    raise ValueError(kind)


def reference_outputs(s, t, labels, tau_t, tau_s, scalar_t, scalar_s, ignore_index=IGNORE):
    """Reference row loss and its gradients (rows are independent: grad of the rows' sum)."""
    s = s.detach().float().requires_grad_()
    t = t.detach().float().requires_grad_()
    if labels is None:  # the launcher's per-row temperatures are (B,); the reference's are (B, 1)
        tau_t, tau_s = (None if tau is None else tau[:, None] for tau in (tau_t, tau_s))
    rows = reference.kd_kl_div(s, t, labels, scalar_t if tau_t is None else tau_t,
                               scalar_s if tau_s is None else tau_s, "none", ignore_index)
    grad_s, grad_t = torch.autograd.grad(rows.sum(), (s, t))
    return rows.detach(), grad_s, grad_t


def assert_matches(outputs, expected, s, t, tau_t, tau_s, scalar_t, scalar_s):
    """Compares (row_loss, grad_s, grad_t) with tolerances set by dtype and logit scale."""
    row_loss, grad_s, grad_t = outputs
    ref_loss, ref_s, ref_t = expected
    inv = [1.0 / (scalar if tau is None else float(tau.min())) for tau, scalar in ((tau_t, scalar_t), (tau_s, scalar_s))]
    finite = [x.float()[torch.isfinite(x.float())] for x in (t, s)]
    logit_scale = 1.0 + max(float(f.abs().max()) * i if f.numel() else 0.0 for f, i in zip(finite, inv))
    atol = 4e-6 * logit_scale
    assert row_loss.dtype == torch.float32 and row_loss.shape == ref_loss.shape
    torch.testing.assert_close(row_loss, ref_loss, rtol=1e-4, atol=atol)
    for grad, ref, logits, inverse in ((grad_s, ref_s, s, inv[1]), (grad_t, ref_t, t, inv[0])):
        assert grad.dtype == logits.dtype and grad.shape == logits.shape and grad.is_contiguous()
        rounding = 0.0 if logits.dtype == torch.float32 else torch.finfo(logits.dtype).eps
        torch.testing.assert_close(grad.float(), ref, rtol=2 * rounding + 1e-4,
                                   atol=(atol + rounding * float(ref.abs().max())) * inverse)


def run_case(s, t, kind, online=None, config=None, generator=None, low=0.5, high=3.0):
    batch, num_classes = s.shape
    labels, tau_t, tau_s, scalar_t, scalar_s = temperatures(kind, batch, num_classes, low, high, generator)
    if labels is not None:
        labels[::3] = IGNORE
    s_before, t_before = s.clone(), t.clone()
    outputs = kd.launch(s, t, labels, tau_t, tau_s, scalar_t, scalar_s, IGNORE, True, True, online=online,
                        config=config)
    assert torch.equal(s, s_before) and torch.equal(t, t_before), "the kernel wrote into its inputs"
    expected = reference_outputs(s.cpu(), t.cpu(), None if labels is None else labels.cpu(),
                                 None if tau_t is None else tau_t.cpu(), None if tau_s is None else tau_s.cpu(),
                                 scalar_t, scalar_s)
    assert_matches([x.cpu() for x in outputs], expected, s.cpu(), t.cpu(), tau_t, tau_s, scalar_t, scalar_s)
    if labels is not None:
        ignored = labels.cpu() == IGNORE
        assert (outputs[0].cpu()[ignored] == 0).all() and (outputs[1].cpu()[ignored] == 0).all()


ONLINE_SMALL = {"BLOCK_M": 4, "BLOCK_N": 16, "num_warps": 4}

# (B, C, temperature kind): not every combination; C > 1 everywhere but one case.
SHAPES = [(1, 1, "scalar"), (3, 2, "class"), (128, 10, "class-both"), (257, 10, "row"), (3, 100, "scalar-labels"),
          (128, 100, "class"), (3, 1000, "row"), (1, 1000, "class")]


@pytest.mark.parametrize("batch,num_classes,kind", SHAPES)
def test_tile_kernel_matches_reference(batch, num_classes, kind):
    g = torch.Generator().manual_seed(batch * 1000 + num_classes)
    run_case(make_logits(batch, num_classes, torch.float32, generator=g),
             make_logits(batch, num_classes, torch.float32, generator=g), kind, generator=g)


@pytest.mark.parametrize("batch,num_classes,kind", [(5, 1, "class"), (9, 37, "class-both"), (6, 100, "row"),
                                                    (257, 10, "scalar-labels")])
def test_online_kernel_at_small_c(batch, num_classes, kind):
    """The online kernel forced at small C with 16-column blocks: several blocks, a partial last one."""
    g = torch.Generator().manual_seed(7 + num_classes)
    run_case(make_logits(batch, num_classes, torch.float32, generator=g),
             make_logits(batch, num_classes, torch.float32, generator=g), kind, online=True,
             config=ONLINE_SMALL, generator=g)


@pytest.mark.parametrize("batch,num_classes,dtype", [(2, 50257, torch.float32), (1, 8193, torch.bfloat16),
                                                     (1, 8192, torch.float16)])
def test_kernel_choice_at_large_c(batch, num_classes, dtype):
    """C = 50257 and 8193 take the online kernel (C not a multiple of its block), 8192 the tile kernel."""
    g = torch.Generator().manual_seed(num_classes)
    run_case(make_logits(batch, num_classes, dtype, generator=g), make_logits(batch, num_classes, dtype, generator=g),
             "class" if batch > 1 else "row", generator=g)
    assert kd.ONLINE_THRESHOLD == 8192


DTYPE_PAIRS = [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
               (torch.float32, torch.float16), (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS)
def test_half_and_mixed_dtypes(student_dtype, teacher_dtype, online):
    g = torch.Generator().manual_seed(3)
    run_case(make_logits(19, 33, student_dtype, generator=g), make_logits(19, 33, teacher_dtype, generator=g),
             "class", online=online, config=ONLINE_SMALL if online else None, generator=g)


@pytest.mark.parametrize("layout", ["transposed", "column-slice", "row-slice"])
@pytest.mark.parametrize("online", [False, True])
def test_non_contiguous_inputs(layout, online):
    g = torch.Generator().manual_seed(5)
    s = make_logits(11, 40, torch.float32, layout, generator=g)
    t = make_logits(11, 40, torch.bfloat16, "transposed" if layout != "transposed" else "row-slice", generator=g)
    assert not s.is_contiguous() and not t.is_contiguous()
    run_case(s, t, "class-both", online=online, config=ONLINE_SMALL if online else None, generator=g)


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("low,high", [(0.05, 0.05), (50.0, 50.0), (0.05, 50.0)])
def test_extreme_temperatures(low, high, online):
    g = torch.Generator().manual_seed(11)
    run_case(make_logits(13, 50, torch.float32, scale=8.0, generator=g),
             make_logits(13, 50, torch.float32, scale=8.0, generator=g), "class-both", online=online,
             config=ONLINE_SMALL if online else None, generator=g, low=low, high=high)


@pytest.mark.parametrize("online", [False, True])
def test_infinite_and_huge_logits(online):
    """-inf teacher logits (0 log 0 = 0, also where the student is -inf) and +/-1e4 logits."""
    g = torch.Generator().manual_seed(13)
    s = make_logits(12, 45, torch.float32, generator=g)
    t = make_logits(12, 45, torch.float32, generator=g)
    t[0, :44] = float("-inf")                 # one class left
    t[1, ::2] = float("-inf")
    s[1, ::4] = float("-inf")                 # student -inf only where the teacher is -inf
    t[2, 5], s[2, 7] = 1e4, -1e4
    t[3], s[3] = 1e4 * torch.sign(t[3]), 1e4 * torch.sign(s[3])
    t[4, 30:] = float("-inf")                 # the last blocks of the online kernel hold only -inf
    t[5, :20] = float("-inf")                 # and the first ones
    s[5, :3] = float("-inf")
    run_case(s, t, "class", online=online, config=ONLINE_SMALL if online else None, generator=g)


@pytest.mark.parametrize("online", [False, True])
def test_student_minus_inf_under_teacher_mass_gives_inf(online):
    s = torch.zeros(2, 20, device=DEVICE)
    t = torch.zeros(2, 20, device=DEVICE)
    s[0, 3] = float("-inf")
    s[1, 3], t[1, 3] = float("-inf"), -200.0   # teacher probability underflows to 0: finite KL
    rows, _, _ = kd.launch(s, t, None, None, None, 1.0, 1.0, IGNORE, False, False, online=online,
                           config=ONLINE_SMALL if online else None)
    expected = reference.kd_kl_div(s.cpu(), t.cpu(), reduction="none")
    assert math.isinf(rows[0]) and rows[0] > 0
    torch.testing.assert_close(rows[1:].cpu(), expected[1:])


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("student_grad,teacher_grad", [(True, False), (False, True), (False, False)])
def test_gradient_flags(student_grad, teacher_grad, online):
    g = torch.Generator().manual_seed(17)
    s = make_logits(7, 30, torch.bfloat16, generator=g)
    t = make_logits(7, 30, torch.float16, generator=g)
    labels, tau_t, tau_s, scalar_t, scalar_s = temperatures("class", 7, 30, generator=g)
    config = ONLINE_SMALL if online else None
    full = kd.launch(s, t, labels, tau_t, tau_s, scalar_t, scalar_s, IGNORE, True, True, online=online, config=config)
    rows, grad_s, grad_t = kd.launch(s, t, labels, tau_t, tau_s, scalar_t, scalar_s, IGNORE, student_grad,
                                     teacher_grad, online=online, config=config)
    assert torch.equal(rows, full[0])
    for asked, grad, reference_grad in ((student_grad, grad_s, full[1]), (teacher_grad, grad_t, full[2])):
        if asked:
            assert torch.equal(grad, reference_grad)
        else:
            assert grad.shape == (0,) and grad.dtype == reference_grad.dtype


def test_contract_entry_point_and_empty_batch():
    g = torch.Generator().manual_seed(19)
    s, t = make_logits(4, 6, torch.float32, generator=g), make_logits(4, 6, torch.float32, generator=g)
    ours = kd.kd_kl_div_forward(s, t, None, None, None, 1.0, 1.0, IGNORE, True, False)
    torch.testing.assert_close(ours[0].cpu(), reference.kd_kl_div(s.cpu(), t.cpu(), reduction="none"))
    rows, grad_s, grad_t = kd.kd_kl_div_forward(s[:0], t[:0], None, None, None, 1.0, 1.0, IGNORE, True, False)
    assert rows.shape == (0,) and grad_s.shape == (0, 6) and grad_t.shape == (0,)


def _bad_call(**changes):
    s = torch.zeros(4, 5, device=DEVICE)
    args = dict(student_logits=s, teacher_logits=s.clone(), labels=torch.tensor([0, 1, IGNORE, 4], device=DEVICE),
                teacher_temperature=torch.ones(5, device=DEVICE), student_temperature=None,
                teacher_temperature_scalar=1.0, student_temperature_scalar=1.0, ignore_index=IGNORE,
                student_grad=True, teacher_grad=False)
    args.update(changes)
    return kd.kd_kl_div_forward(**args)


@pytest.mark.parametrize("changes,message", [
    ({"student_logits": torch.zeros(4, 6)}, "shape"),
    ({"student_logits": torch.zeros(4, 5, dtype=torch.float64)}, "float64"),
    ({"labels": torch.zeros(3, dtype=torch.int64)}, "labels"),
    ({"labels": torch.zeros(4, dtype=torch.int32)}, "labels"),
    ({"teacher_temperature": torch.ones(4)}, "teacher_temperature"),
    ({"labels": None, "teacher_temperature": None, "student_temperature": torch.ones(5)}, "student_temperature"),
])
def test_bad_metadata_is_a_value_error(changes, message):
    changes = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in changes.items()}
    with pytest.raises(ValueError, match=message):
        _bad_call(**changes)


@pytest.mark.skipif(HAS_GPU, reason="on a GPU these are device asserts, which end the CUDA context")
@pytest.mark.parametrize("changes,message", [
    ({"labels": torch.tensor([0, 5, IGNORE, 4])}, "labels"),
    ({"labels": torch.tensor([0, -1, 2, 4])}, "labels"),
    ({"teacher_temperature": torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0])}, "teacher_temperature"),
    ({"teacher_temperature": torch.tensor([1.0, 1.0, 1.0, 1.0, float("inf")])}, "teacher_temperature"),
    ({"labels": None, "teacher_temperature": None, "student_temperature": torch.tensor([1.0, 1.0, float("nan"), 1.0])},
     "student_temperature"),
])
def test_bad_values_are_checked_on_cpu(changes, message):
    """As the C++ kernel's TORCH_CHECK (and a device assert on a GPU): a RuntimeError."""
    with pytest.raises(RuntimeError, match=message):
        _bad_call(**changes)


@pytest.mark.parametrize("scalar", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scalar_temperature(scalar):
    with pytest.raises(RuntimeError, match="student_temperature_scalar"):
        _bad_call(student_temperature_scalar=scalar)


@pytest.mark.skipif(HAS_GPU, reason="CPU-only path")
def test_unused_bad_temperature_is_not_an_error():
    """Only temperatures that rows use are checked (class 2 is unused, class 3's row is ignored)."""
    rows, _, _ = _bad_call(labels=torch.tensor([0, 1, IGNORE, 4]),
                           teacher_temperature=torch.tensor([1.0, 1.0, -1.0, 1.0, 1.0]))
    assert torch.isfinite(rows).all()


@pytest.mark.parametrize("online", [False, True])
def test_bad_rows_degrade_to_nan_without_asserts(online):
    """Without device asserts (interpreter, or a build without debug) a bad row reads NaN, not garbage."""
    s = torch.zeros(3, 5, device=DEVICE)
    labels = torch.tensor([0, 7, 1], device=DEVICE)
    tau = torch.tensor([1.0, -2.0, 1.0, 1.0, 1.0], device=DEVICE)
    config = ONLINE_SMALL if online else kd.tile_config(3, 5)
    row_loss = torch.empty(3, device=DEVICE)
    grad = torch.empty(3, 5, device=DEVICE)
    kd._kd_kl_div_kernel[(1,)](s, s, labels, tau, row_loss, row_loss, grad, grad, 3, 5, 5, 1, 5, 1, 1, 1.0, 1.0,
                               kd.BY_LABEL, kd.SCALAR, 1, IGNORE, 1, 0, ONLINE=online, BLOCK_M=4,
                               BLOCK_N=config["BLOCK_N"])
    assert row_loss[0] == 0 and row_loss[1:].isnan().all() and grad[1:].isnan().all() and (grad[0] == 0).all()


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 9), num_classes=st.integers(1, 70), kind=st.sampled_from(["scalar", "class", "row"]),
       log_low=st.floats(math.log(0.05), math.log(50.0)), log_span=st.floats(0.0, 3.0),
       scale=st.sampled_from([0.01, 1.0, 30.0, 1000.0]), online=st.booleans(), seed=st.integers(0, 2**16))
def test_property_random_shapes_and_temperatures(batch, num_classes, kind, log_low, log_span, scale, online, seed):
    g = torch.Generator().manual_seed(seed)
    low = math.exp(log_low)
    high = min(50.0, low * math.exp(log_span))
    run_case(make_logits(batch, num_classes, torch.float32, scale=scale, generator=g),
             make_logits(batch, num_classes, torch.float32, scale=scale, generator=g), kind, online=online,
             config=ONLINE_SMALL if online else None, generator=g, low=low, high=high)


def _signature(kernel, student, teacher, constexprs):
    pointers = {"s_ptr": student, "t_ptr": teacher, "gs_ptr": student, "gt_ptr": teacher, "labels_ptr": "i64"}
    signature = {}
    for name in kernel.arg_names:
        if name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, "fp32")
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "fp32" if name.endswith("_scalar") else ("i64" if name.startswith("stride") else "i32")
    return signature


# What a launch with freshly allocated (B, C) tensors, C a multiple of 16, specialises on.
ALIGNED = ("s_ptr", "t_ptr", "labels_ptr", "tau_t_ptr", "tau_s_ptr", "loss_ptr", "gs_ptr", "gt_ptr", "C", "stride_sb",
           "stride_tb")
DTYPE_NAMES_ALL = ["fp32", "fp16", "bf16"]
DTYPE_PAIRS_ALL = [(student, teacher) for student in DTYPE_NAMES_ALL for teacher in DTYPE_NAMES_ALL]


def _variants():
    """Both kernel forms for each (student, teacher) dtype pair, with the launch options (device
    asserts on); contiguous logits (unit column stride, which Triton specialises) except, for a
    third of the pairs each, any strides; the tile kernel alternately at its narrowest and widest."""
    variants = []
    for index, (student, teacher) in enumerate(DTYPE_PAIRS_ALL):
        tile = kd.tile_config(128, 10) if index % 2 else kd.tile_config(1, kd.ONLINE_THRESHOLD)
        for online, config in enumerate([tile, kd.online_config(8, 262144)]):
            constexprs = {"ONLINE": bool(online), "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}
            contiguous = index % 3 != online
            if contiguous:
                constexprs.update(stride_sc=1, stride_tc=1)
            kernel = kd._kd_kl_div_kernel
            variants.append({"kernel": kernel, "constexprs": constexprs, "divisible_by_16": ALIGNED,
                             "signature": _signature(kernel, student, teacher, constexprs),
                             "options": {"num_warps": config["num_warps"], "debug": True, "sanitize_overflow": False},
                             "name": f"{'online' if online else 'tile'} s={student} t={teacher} contiguous={contiguous}"})
    return variants


VARIANTS = _variants()


@pytest.fixture(scope="module")
def compiled_variants():
    return compile_many_for_gpus([{k: v for k, v in job.items() if k != "name"} for job in VARIANTS])


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=[job["name"] for job in VARIANTS])
def test_every_variant_compiles_for_sm80_and_sm90(compiled_variants, index):
    for capability in (80, 90):
        assert compiled_variants[index][capability].asm["cubin"]
        ptx = compiled_variants[index][capability].asm["ptx"]
        assert "__assertfail" in ptx, "device asserts were compiled out"
        if "stride_sc" in VARIANTS[index]["constexprs"]:
            assert "ld.global.v" in ptx, "contiguous logits should be read with vector loads"
