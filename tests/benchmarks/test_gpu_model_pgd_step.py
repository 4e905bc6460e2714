"""benchmarks.gpu_model.pgd_step: its launch plan matches the CUDA source, and its claims hold for
the built sm_90 kernels (no spills, enough waves at the large shape, the minimum of 4 element
passes, every launch counted, host, DRAM, issue and wait times in every row)."""

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
    return model.rows(resources["sm_90"], host_us=10.0)


def test_launch_constants_match_the_cuda_source():
    source = open(model.CUDA_SOURCE).read()
    constants = {"kThreads": model.THREADS, "kPacksPerThread": model.PACKS_PER_THREAD,
                 "kFusedMaxThreads": model.FUSED_MAX_THREADS, "kFusedPacks": model.FUSED_PACKS,
                 "kFinalizeWarps": model.FINALIZE_WARPS, "kPackBytes": model.PACK_BYTES,
                 "kMaxGridY": model.MAX_GRID_Y, "kCooperativeMinBlocks": model.COOPERATIVE_MIN_BLOCKS}
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
    for shape in model.SHAPES + ((4, 3, 1024, 1024),):
        for dtype in ("float32", "bfloat16", "float16", "float64"):
            numel, width = math.prod(shape), model.PACK_BYTES // model.ELEMENT_BYTES[dtype]
            linf, = model.launch_plan(shape, dtype, "linf")
            assert linf["grid"][0] * linf["block"] * width >= numel
            for launch in model.launch_plan(shape, dtype, "l2"):
                if "fused" in launch["kernel"]:
                    assert launch["grid"][0] == shape[0]
                    assert launch["block"] * model.FUSED_PACKS * width >= numel // shape[0]
                elif "cooperative" in launch["kernel"]:
                    packs = model.cooperative_packs(dtype, width)
                    assert launch["tiles"] == shape[0] * launch["chunks"]
                    assert launch["chunks"] * model.THREADS * packs * width >= numel // shape[0]
                    # No deadlock: a sample's chunks are all resident at once.
                    assert launch["chunks"] <= launch["grid"][0] <= model.COOPERATIVE_MIN_BLOCKS * model.SMS
                elif "partial" in launch["kernel"] or "apply" in launch["kernel"]:
                    chunks, samples = launch["grid"]
                    assert samples == shape[0]
                    assert chunks * model.THREADS * model.PACKS_PER_THREAD * width >= numel // shape[0]


def test_samples_too_large_for_one_resident_grid_take_the_five_kernel_path():
    shape = (2, 3, 2048, 2048)  # 3072 chunks of 4096 fp32 elements: more than 2 * 132 blocks
    kernels = [launch["kernel"] for launch in model.launch_plan(shape, "float32", "l2")]
    assert len(kernels) == 5 and kernels[0].startswith("l2_grad_partial_kernel")
    kernels = [launch["kernel"] for launch in model.launch_plan(shape, "float32", "l2", resident_blocks=4096)]
    assert kernels == [model.MEMSET, "l2_cooperative_kernel<float, 4, 4>"]


def test_sass_opcodes_are_read_with_and_without_predicates():
    lines = ["        /*0040*/                   LDG.E.128 R4, desc[UR4][R2.64] ;",
             "        /*0050*/              @!P0 BRA 0x120 ;", "        /*0060*/                   NOP;",
             "        /*0070*/          @P1 FFMA R1, R2, R3, R1 ;", "  .headerflags    @\"EF_CUDA_SM90\""]
    found = [m.group(1) for m in map(model._SASS_OPCODE.search, lines) if m]
    assert found == ["LDG", "BRA", "NOP", "FFMA"]


@needs_cubin
def test_every_planned_kernel_is_compiled(resources):
    for arch, kernels in resources.items():
        for shape in model.SHAPES:
            for dtype in ("float32", "bfloat16", "float16", "float64"):
                for norm in model.NORMS:
                    for launch in model.launch_plan(shape, dtype, norm):
                        assert launch["kernel"] in kernels or launch["kernel"] == model.MEMSET, (arch, launch)


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
                    if "finalize" in launch["kernel"] or launch["kernel"] == model.MEMSET:
                        continue
                    res = kernels[launch["kernel"]]
                    assert res["wide_loads"] >= 1, launch["kernel"]
                    if "partial" not in launch["kernel"]:
                        assert res["wide_stores"] >= 1, launch["kernel"]


@needs_cubin
def test_the_large_shape_fills_the_gpu(table):
    for row in table:
        if row["shape"] == (512, 3, 224, 224):
            assert row["min_waves"] >= 1, row  # the persistent kernel: one full wave, by design
        for launch in row["launches"]:
            if launch["kernel"] != model.MEMSET:
                assert launch["ctas_per_sm"] >= 2, launch


@needs_cubin
def test_every_step_makes_at_most_four_element_passes(table):
    """L-inf, the one-block L2 step and the persistent L2 step move the minimum of element traffic
    (the large L2 step made 8 passes before); per-sample data adds under 0.1%."""
    for row in table:
        assert row["element_passes"] == 4, row
        assert row["bytes_over_min"] < 1.001, row
        if row["norm"] == "linf" or row["shape"][1:] == (3, 32, 32):
            assert row["kernels_per_step"] == 1, row
        else:
            assert row["kernels_per_step"] == 2 and row["launches"][0]["kernel"] == model.MEMSET, row
            assert row["element_passes_before"] == 8
        assert row["min_bytes_per_element"] == 4 * model.ELEMENT_BYTES[row["dtype"]]


@needs_cubin
def test_time_per_call_adds_up(table):
    """A call takes the larger of host and device time; the device time counts every launch, the
    larger of DRAM (at 90% of the peak) and issue time per kernel, and the persistent kernel's waits."""
    for row in table:
        launches = row["launches"]
        assert row["host_us"] == pytest.approx(10.0 + len(launches) * model.hardware.HOST_LAUNCH_S * 1e6)
        kernels = sum(max(launch["dram_us"], launch["issue_us"]) + launch["sync_us"] for launch in launches)
        assert row["device_us"] == pytest.approx(row["launch_us"] + kernels)
        assert row["model_us"] == max(row["host_us"], row["device_us"])
        for launch in launches:
            assert launch["dram_us"] == pytest.approx(launch["dram_bytes"] / (0.9 * 3.35e12) * 1e6)
            if launch["kernel"] != model.MEMSET:
                assert launch["instructions"] > 0 and launch["issue_us"] > 0, launch
            if "cooperative" in launch["kernel"]:
                rounds = math.ceil(launch["tiles"] / launch["ctas"])
                assert launch["sync_us"] == pytest.approx(2 * rounds * model.BARRIER_S * 1e6)


def test_the_host_time_of_a_call_is_measured():
    us = model.host_call_us(repeats=50)
    assert 0 < us < 10_000


@needs_cubin
def test_rows_cover_the_pgd_shapes(table):
    assert {(r["shape"], r["dtype"], r["norm"]) for r in table} == {
        (s, d, n) for s in model.SHAPES for d in model.DTYPES for n in model.NORMS}
    text = model.format_table(table)
    assert "l2_fused_kernel" in text and "l2_cooperative_kernel" in text and model.MEMSET in text
