"""benchmarks.gpu_model.pgd_step: its launch plan matches the CUDA source, and its claims hold for
the built sm_90 kernels (no spills, enough waves at the large shape, bytes near the minimum)."""

import math
import re
import shutil

import pytest

from benchmarks.gpu_model import pgd_step as model

EXTENSION = model.find_extension()


def _has_tools():
    return EXTENSION is not None and model.find_cuobjdump() is not None and shutil.which("c++filt") is not None


needs_cubin = pytest.mark.skipif(not _has_tools(), reason="needs fastabsld._C, cuobjdump and c++filt")


@pytest.fixture(scope="module")
def resources():
    found = {arch: model.kernel_resources(arch=arch) for arch in ("sm_80", "sm_90")}
    if not all(found.values()):
        pytest.skip("fastabsld._C was built without CUDA kernels for sm_80 and sm_90")
    return found


@pytest.fixture(scope="module")
def table(resources):
    return model.rows(resources["sm_90"])


def test_launch_constants_match_the_cuda_source():
    source = open(model.CUDA_SOURCE).read()
    constants = {"kThreads": model.THREADS, "kPacksPerThread": model.PACKS_PER_THREAD,
                 "kFusedMaxThreads": model.FUSED_MAX_THREADS, "kFusedPacks": model.FUSED_PACKS,
                 "kFinalizeWarps": model.FINALIZE_WARPS, "kPackBytes": model.PACK_BYTES,
                 "kMaxGridY": model.MAX_GRID_Y}
    for name, value in constants.items():
        match = re.search(rf"constexpr \w+ {name} = (\d+);", source)
        assert match, f"{name} not found in pgd_step_cuda.cu"
        assert int(match.group(1)) == value, name


def test_ctas_per_sm_takes_the_tightest_limit():
    assert model.ctas_per_sm(256, 32, 0) == 8            # threads
    assert model.ctas_per_sm(1024, 64, 0) == 1           # registers: 64 * 1024 = 65536
    assert model.ctas_per_sm(256, 255, 0) == 1           # registers: 256 per thread after rounding
    assert model.ctas_per_sm(32, 16, 0) == 32            # CTA limit
    assert model.ctas_per_sm(256, 32, 100 * 1024) == 2   # shared memory


def test_launch_plan_grids_cover_the_batch():
    for shape in model.SHAPES:
        for dtype in ("float32", "bfloat16", "float16", "float64"):
            numel, width = math.prod(shape), model.PACK_BYTES // model.ELEMENT_BYTES[dtype]
            linf, = model.launch_plan(shape, dtype, "linf")
            assert linf["grid"][0] * linf["block"] * width >= numel
            for launch in model.launch_plan(shape, dtype, "l2"):
                if "fused" in launch["kernel"]:
                    assert launch["grid"][0] == shape[0]
                    assert launch["block"] * model.FUSED_PACKS * width >= numel // shape[0]
                elif "finalize" not in launch["kernel"]:
                    chunks, samples = launch["grid"]
                    assert samples == shape[0]
                    assert chunks * model.THREADS * model.PACKS_PER_THREAD * width >= numel // shape[0]


@needs_cubin
def test_every_planned_kernel_is_compiled(resources):
    for arch, kernels in resources.items():
        for shape in model.SHAPES:
            for dtype in ("float32", "bfloat16", "float16", "float64"):
                for norm in model.NORMS:
                    for launch in model.launch_plan(shape, dtype, norm):
                        assert launch["kernel"] in kernels, (arch, launch["kernel"])


@needs_cubin
def test_no_kernel_spills_registers(resources):
    """Every pgd_step kernel, the unaligned fallbacks included, on sm_80 and sm_90."""
    for arch, kernels in resources.items():
        assert len(kernels) >= 40, arch
        for name, res in kernels.items():
            assert res["spill_stores"] == 0 and res["spill_loads"] == 0 and res["local"] == 0, (arch, name, res)


@needs_cubin
def test_aligned_kernels_move_16_byte_packs(resources):
    """The kernels that the plan launches (aligned tensors) load and store 16 bytes at a time."""
    kernels = resources["sm_90"]
    for shape in model.SHAPES:
        for dtype in ("float32", "bfloat16", "float16", "float64"):
            for norm in model.NORMS:
                for launch in model.launch_plan(shape, dtype, norm):
                    if "finalize" in launch["kernel"]:
                        continue
                    res = kernels[launch["kernel"]]
                    assert res["wide_loads"] >= 1, launch["kernel"]
                    if "partial" not in launch["kernel"]:
                        assert res["wide_stores"] >= 1, launch["kernel"]


@needs_cubin
def test_the_large_shape_fills_the_gpu(table):
    for row in table:
        if row["shape"] == (512, 3, 224, 224):
            assert row["min_waves"] >= 4, row
        for launch in row["launches"]:
            assert launch["ctas_per_sm"] >= 2, launch


@needs_cubin
def test_bytes_and_launches(table):
    """L-inf and the one-block L2 step move the minimum; the large L2 step at most twice that."""
    for row in table:
        if row["norm"] == "linf":
            assert row["kernels_per_step"] == 1 and row["bytes_over_min"] == 1.0, row
        elif row["shape"][1:] == (3, 32, 32):
            assert row["kernels_per_step"] == 1 and row["bytes_over_min"] == 1.0, row
            assert row["bytes_per_element"] < row["bytes_per_element_before"]
        else:
            assert row["kernels_per_step"] == 5 and row["bytes_over_min"] <= 2.01, row
        assert row["model_us"] == pytest.approx(row["launch_us"] + row["dram_us"])
        assert row["min_bytes_per_element"] == 4 * model.ELEMENT_BYTES[row["dtype"]]


@needs_cubin
def test_rows_cover_the_pgd_shapes(table):
    assert {(r["shape"], r["dtype"], r["norm"]) for r in table} == {
        (s, d, n) for s in model.SHAPES for d in model.DTYPES for n in model.NORMS}
    assert "l2_fused_kernel" in model.format_table(table)
