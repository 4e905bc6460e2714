"""Every variant of the KD kernels that a real launch picks compiles for sm_80 and sm_90.

The launches come from ``kd.plan`` itself (meta tensors, or small CPU tensors where a pointer
must be misaligned), and ``tests.triton_aot.compile_launches`` specialises each as Triton's
launcher would (unit and 16-divisible integers, 16-byte-aligned pointers, i32 or i64 by value).
The set covers each code path: both forms for every (student, teacher) dtype pair, every vector
width, contiguous, strided, transposed and misaligned logits, 64-bit offsets and arguments, the
staged and the prefetched column loops, the largest and smallest tiles, and the benchmark
shapes the performance model reports. The block sizes ``plan`` can pick range further (one tile
per power of two of C and rows), but each keeps ELEMENTS_PER_THREAD elements a thread or fewer,
which is what sets the registers; the extremes of that range are here.

The eager path's finishing (reduce) and backward (scale) kernels are here too, the split
kernel with its reduction fused in ("sum", "mean") and without (the op), and launches of the
debug mode (``FASTABSLD_DEVICE_ASSERTS=1``). Checked per variant and capability: device asserts
in the code exactly in the debug mode, at most 128 registers a thread and no spills; vector
loads (or 16-byte cp.async) where the rows allow them; a software-pipelined column loop
(cp.async stages or the register prefetch) in the split kernel wherever a chunk has more than
one block; and, for the split kernel, no more shared memory than its plan assumed when it sized
the persistent grid (``kd.split_shared_bytes``), so that the planned programs are resident at once.
"""

import re

import pytest
import torch

from benchmarks.gpu_model import kd_kl_div as model
from fastabsld.kernels import kd_kl_div as kd
from tests.triton_aot import compile_launches

MAX_REGISTERS = 128
# A cp.async of 8 or 16 bytes.
STAGED_WIDE = re.compile(r"cp\.async\.c[ag]\.shared\.global [^;]*, 0x(8|10),")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _logits(batch, num_classes, dtype, layout="contiguous", device="meta"):
    if layout == "contiguous":
        return torch.empty(batch, num_classes, dtype=dtype, device=device)
    if layout == "transposed":
        return torch.empty(num_classes, batch, dtype=dtype, device=device).t()
    if layout == "column-slice":
        return torch.empty(batch, 2 * num_classes, dtype=dtype, device=device)[:, ::2]
    if layout == "offset":
        return torch.zeros(batch * num_classes + 1, dtype=dtype, device="cpu")[1:].view(batch, num_classes)
    if layout.startswith("row-stride="):  # rows far apart: offsets past 2^31 (meta: nothing allocated)
        return torch.empty_strided((batch, num_classes), (int(layout.split("=")[1]), 1), dtype=dtype, device=device)
    raise ValueError(layout)


def _weights(length, misaligned, device):
    """Weights of ``length`` values, 16-byte aligned or not (a misaligned pointer is its own variant)."""
    if misaligned:
        return torch.ones(length + 1, device=device)[1:]
    return torch.ones(length, device=device)


def _launches(name, batch, num_classes, student, teacher, layout="contiguous", teacher_layout=None, grads=(True, True),
              weights=None, reduction=None):
    s = _logits(batch, num_classes, DTYPES[student], layout)
    t = _logits(batch, num_classes, DTYPES[teacher], teacher_layout or layout)
    device = s.device
    labels = torch.zeros(batch, dtype=torch.int64, device=device)
    tau = torch.ones(num_classes, device=device)
    weighting = {}
    if weights is not None:  # "aligned" or "misaligned": a per-class and a per-row weight
        misaligned = weights == "misaligned"
        weighting = {"weight": _weights(num_classes, misaligned, device),
                     "sample_weight": _weights(batch, misaligned, device), "sample_weight_scalar": 0.5}
    _, launches = kd.plan(s, t, labels, tau, None, 1.0, 1.0, -100, *grads, reduction=reduction, **weighting)
    return [(f"{name} {launch.kernel.__name__.strip('_')}", launch) for launch in launches]


def _backward_launches(name, batch, num_classes, stored, logits, per_row, grad_output_stride=1):
    """The backward's scaling launch of a stored gradient (fp32 for fp16 logits) into the logits' dtype."""
    grad = torch.empty(batch, num_classes, dtype=DTYPES[stored], device="meta")
    if per_row:
        grad_output, scale = torch.empty_strided((batch,), (grad_output_stride,), device="meta"), None
    else:
        grad_output, scale = torch.empty((), device="meta"), torch.empty(1, device="meta")
    launches = kd.scale_plan(grad, grad_output, scale, DTYPES[logits])
    return [(f"{name} {launch.kernel.__name__.strip('_')}", launch) for launch in launches]


def _debug_launches(name, *args, **kwargs):
    """Launches with the device asserts compiled in (``FASTABSLD_DEVICE_ASSERTS=1``)."""
    previous, kd.DEVICE_ASSERTS = kd.DEVICE_ASSERTS, True
    try:
        return _launches(name, *args, **kwargs)
    finally:
        kd.DEVICE_ASSERTS = previous


def _real_launches():
    cases = []
    for (batch, num_classes) in model.SHAPES:
        for dtype in model.DTYPES:
            cases += [(f"model ({batch}, {num_classes}) {dtype}", model.plan_case(batch, num_classes, DTYPES[dtype]))]
    cases = [(f"{name} {launch.kernel.__name__.strip('_')}", launch) for name, launches in cases for launch in launches]
    for student in DTYPES:
        for teacher in DTYPES:
            cases += _launches(f"tile s={student} t={teacher}", 1024, 96, student, teacher)
            cases += _launches(f"split s={student} t={teacher}", 4, 40000, student, teacher)
    for form, (batch, num_classes) in (("tile", (1000, 40)), ("split", (4, 20000))):
        cases += _launches(f"{form} transposed (16 | B)", 1024 if form == "tile" else 16, num_classes, "fp32", "bf16",
                           "transposed")
        cases += _launches(f"{form} transposed", batch, num_classes, "bf16", "fp32", "transposed", "contiguous")
        cases += _launches(f"{form} column-slice", batch, num_classes, "fp32", "fp32", "column-slice")
        cases += _launches(f"{form} misaligned", batch if form == "tile" else 2, num_classes, "fp32", "bf16", "offset")
    cases += _launches("tile C=2 (256-row tiles)", 100000, 2, "fp32", "fp32")
    cases += _launches("tile C=1", 3, 1, "bf16", "bf16")
    cases += _launches("tile C=8192 (32 warps)", 4096, 8192, "fp32", "fp32")
    cases += _launches("tile 256 x 32", 65536, 32, "bf16", "bf16")
    cases += _launches("tile odd C (scalar loads)", 1000, 37, "bf16", "fp16")
    cases += _launches("tile 64-bit offsets", 8192, 100, "fp32", "fp32", "row-stride=268435456")
    cases += _launches("tile 64-bit strides", 16, 1000, "bf16", "bf16", "row-stride=4294967296")
    cases += _launches("split 64-bit offsets", 32768, 70000, "fp32", "fp32", "transposed")
    # Chunks of several blocks (the pipelined column loops): many rows, odd C (2-byte scalar loads).
    cases += _launches("split prefetch", 4096, 50257, "bf16", "bf16")
    cases += _launches("split prefetch mixed", 4096, 50257, "fp16", "fp32")
    cases += _launches("split prefetch transposed", 4096, 20000, "fp16", "fp16", "transposed")
    cases += _launches("split staged, no gradients", 4096, 32000, "fp32", "fp32", grads=(False, False))
    cases += _launches("split student gradient only", 64, 262144, "fp32", "bf16", grads=(True, False))
    cases += _launches("split teacher gradient only", 4, 40000, "bf16", "fp32", grads=(False, True))
    cases += _launches("split sum", 4, 20000, "fp32", "fp32", reduction="sum")
    cases += _launches("split mean", 4096, 50257, "bf16", "bf16", reduction="mean")
    cases += _launches("split batchmean, 1-warp programs", 8, 8192, "fp32", "fp32", reduction="batchmean")
    # The weights' presence is a runtime flag: weighted launches compile the variants above, except
    # where a weight's pointer is not 16-byte aligned.
    cases += _launches("tile weighted", 1024, 96, "bf16", "bf16", weights="aligned")
    cases += _launches("tile misaligned weights", 1000, 40, "fp32", "bf16", "offset", weights="misaligned")
    cases += _launches("split misaligned weights", 2, 20000, "fp32", "bf16", "offset", weights="misaligned")
    # The eager path's finishing and backward kernels; the debug mode's asserts.
    cases += [case for case in _launches("tile mean", 128, 10, "fp32", "fp32", reduction="mean")
              if "reduce" in case[0]]
    cases += [case for case in _launches("tile sum no labels", 128, 10, "fp32", "fp32", reduction="sum")
              if "reduce" in case[0]]
    cases += _backward_launches("backward fp16", 128, 100, "fp32", "fp16", per_row=False)
    cases += _backward_launches("backward bf16 per row", 8, 32000, "bf16", "bf16", per_row=True)
    cases += _backward_launches("backward stride-0 rows", 128, 10, "fp32", "fp32", per_row=True, grad_output_stride=0)
    cases += _backward_launches("backward 64-bit", 65536, 65536, "fp32", "fp32", per_row=False)
    cases += _debug_launches("debug tile", 1024, 96, "fp32", "fp32")
    cases += _debug_launches("debug split", 4, 40000, "bf16", "bf16")
    cases += _debug_launches("debug split prefetch", 4096, 50257, "fp16", "fp32")
    cases += _debug_launches("debug split mean", 8, 32000, "fp32", "fp32", reduction="mean")
    return cases


REAL_LAUNCHES = _real_launches()


@pytest.fixture(scope="module")
def compiled():
    return compile_launches([launch for _, launch in REAL_LAUNCHES])


def test_the_variants_cover_every_code_path():
    forms = {(launch.kernel.__name__, launch.constexprs.get("PREFETCH"), launch.constexprs["WIDE"],
              launch.constexprs["VEC"]) for _, launch in REAL_LAUNCHES if "VEC" in launch.constexprs}
    kernels = {launch.kernel.__name__ for _, launch in REAL_LAUNCHES}
    assert {"_kd_reduce_kernel", "_kd_scale_kernel"} <= kernels
    for kernel in ("_kd_tile_kernel", "_kd_split_kernel"):
        debug = {launch.debug for _, launch in REAL_LAUNCHES if launch.kernel.__name__ == kernel}
        assert debug == {False, True}, f"{kernel} with and without device asserts"
    split = [launch for _, launch in REAL_LAUNCHES if launch.kernel is kd._kd_split_kernel]
    assert {(launch.constexprs["REDUCE"], launch.constexprs["MEAN"]) for launch in split} == \
        {(False, False), (True, False), (True, True)}, "the split kernel without, with a sum and with a mean"
    assert {launch.constexprs["NUM_STAGES"] > 1 or launch.constexprs["PREFETCH"] for launch in split} == {False, True}
    assert {(launch.constexprs["STUDENT_GRAD"], launch.constexprs["TEACHER_GRAD"]) for launch in split} == \
        {(False, False), (True, False), (False, True), (True, True)}, "the gradients are compiled in"
    for kernel in ("_kd_tile_kernel", "_kd_split_kernel"):
        for vec in (1, 2, 4, 8) if kernel == "_kd_tile_kernel" else (1, 4, 8):
            assert any(f[0] == kernel and f[3] == vec for f in forms), (kernel, vec)
        assert any(f[0] == kernel and f[2] for f in forms), f"{kernel} with 64-bit offsets"
    assert any(f[1] for f in forms) and any(f[1] is False for f in forms)
    strides = [launch.args[launch.kernel.arg_names.index("stride_sb")] for _, launch in REAL_LAUNCHES
               if "stride_sb" in launch.kernel.arg_names]
    assert max(strides) >= 2**31, "a launch with 64-bit integer arguments"
    for kernel in ("_kd_tile_kernel", "_kd_split_kernel"):
        weighted = [dict(zip(launch.kernel.arg_names, launch.args)) for _, launch in REAL_LAUNCHES
                    if launch.kernel.__name__ == kernel]
        weighted = [args for args in weighted if args["has_weight"] and args["has_sample_weight"]]
        assert any(args["weight_ptr"].data_ptr() % 16 for args in weighted), f"{kernel} with misaligned weights"


@pytest.mark.parametrize("index", range(len(REAL_LAUNCHES)), ids=[name for name, _ in REAL_LAUNCHES])
def test_variant_compiles_for_sm80_and_sm90_without_spills(compiled, index):
    launch = REAL_LAUNCHES[index][1]
    args = dict(zip(launch.kernel.arg_names, launch.args))
    for capability in (80, 90):
        kernel = compiled[index][capability]
        assert kernel.asm["cubin"]
        ptx = kernel.asm["ptx"]
        assert ("__assertfail" in ptx) == launch.debug, "device asserts compiled in exactly in the debug mode"
        usage = kernel.resources
        assert usage["registers"] <= MAX_REGISTERS, usage
        assert usage["stack"] == 0 and usage["local"] == 0, f"spills: {usage}"
        assert kernel.metadata["num_warps"] == launch.num_warps
        if "s_ptr" not in args:  # the finishing and backward kernels: no logits
            continue
        logits = [args["s_ptr"], args["t_ptr"]]
        aligned = all(t.data_ptr() % 16 == 0 for t in logits) and all(t.stride(1) == 1 for t in logits)
        vector_bytes = launch.constexprs["VEC"] * min(t.element_size() for t in logits)
        block = launch.constexprs.get("BLOCK_M", 1) * launch.constexprs["BLOCK_N"]
        threads = 32 * launch.num_warps
        staged = launch.kernel is not kd._kd_tile_kernel and launch.num_stages > 1
        if aligned and vector_bytes >= 8 and block >= threads * launch.constexprs["VEC"]:
            wide = STAGED_WIDE.search(ptx) if staged else "ld.global.v" in ptx
            assert wide, "aligned rows should be read with vector accesses"
        if launch.kernel is kd._kd_split_kernel:
            assert ("cp.async" in ptx) == staged, "the column loop is staged with cp.async exactly when asked"
            if args["blocks_per_chunk"] > 1:
                assert staged or launch.constexprs["PREFETCH"], "the column loop is pipelined one way or the other"
            input_bytes = sum(t.element_size() for t in logits)
            planned = kd.split_shared_bytes(launch.constexprs["BLOCK_N"], launch.num_stages, input_bytes)
            assert usage["shared"] + kernel.metadata["shared"] <= planned, "more shared memory than the grid assumed"
            assert usage["registers"] <= kd.SPLIT_MAX_REGISTERS
