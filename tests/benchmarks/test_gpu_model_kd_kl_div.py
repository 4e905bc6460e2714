"""benchmarks.gpu_model: the arithmetic, and the claims its KD table makes about the kernels.

The KD rows come from the real launch plan and the sm_90 variants compiled ahead of time, so a
change that loses a claim (waves, DRAM traffic, registers, spills) fails here.
"""

import pytest
import torch

from benchmarks.gpu_model import __main__ as gpu_model_main
from benchmarks.gpu_model import hardware, kd_kl_div

MIB = 1024 * 1024


def test_occupancy_arithmetic():
    # 128 registers x 32 threads = 4096 per warp: 16 warps an SM, 2 CTAs of 8 warps
    assert hardware.ctas_per_sm(128, 8, 0) == (2, "registers")
    # 1-warp CTAs with few registers: the 32-CTA limit
    assert hardware.ctas_per_sm(24, 1, 0) == (32, "ctas")
    # 16 registers, 8 warps: 2048 threads at most, 8 CTAs
    assert hardware.ctas_per_sm(16, 8, 0) == (8, "threads")
    # 100 KiB of shared memory (+1 KiB reserved) a CTA: 2 of them in 228 KiB
    assert hardware.ctas_per_sm(32, 4, 100 * 1024) == (2, "shared")
    # registers round up to 256 a warp: 33 registers take 40
    assert hardware.ctas_per_sm(33, 4, 0)[0] == 65536 // (40 * 32) // 4


def test_waves_and_roofline():
    assert hardware.waves(264) == 2.0
    assert hardware.roofline_seconds(3.35e12, 0) == pytest.approx(1.0)
    assert hardware.roofline_seconds(0, 3) == pytest.approx(3 * hardware.LAUNCH_OVERHEAD_S)
    assert hardware.roofline_seconds(4.8e12, 1, hardware.H200) == pytest.approx(1.0 + hardware.LAUNCH_OVERHEAD_S)


HOST_US = {(128, 10): 30.0, (8, 32000): 50.0}  # stand-ins for the host-cost benchmark's figures


@pytest.fixture(scope="module")
def kd_rows():
    return kd_kl_div.rows(host_us=HOST_US)


def test_kd_rows_cover_the_shapes_and_dtypes(kd_rows):
    cases = {row["case"] for row in kd_rows}
    assert cases == {f"({b}, {c}) {d}" for b, c in kd_kl_div.SHAPES for d in ("fp32", "bf16")}
    assert {(8, 32000), (64, 262144), (4096, 32000), (128, 10), (1024, 100), (256, 1000)} <= set(kd_kl_div.SHAPES)


def test_kd_fills_the_gpu(kd_rows):
    """>= 2 waves of programs from 1 MiB of logits, >= 1 from 256 KiB, in every launch (but the
    finishing kernel's one program, which reads B floats, and the split form's memset)."""
    checked = set()
    for row in kd_rows:
        for launch in row["launches"]:
            if launch["kernel"] == "kd_reduce_kernel":
                assert launch["programs"] == 1
                continue
            if launch["kernel"] == kd_kl_div.MEMSET:
                continue
            if row["logit_bytes"] >= MIB:
                assert launch["waves"] >= 2, (row["case"], launch)
                checked.add(row["case"])
            elif row["logit_bytes"] >= 256 * 1024:
                assert launch["waves"] >= 1, (row["case"], launch)
                checked.add(row["case"])
    for case in ("(1024, 100) fp32", "(256, 1000) fp32", "(8, 32000) fp32", "(8, 32000) bf16", "(64, 262144) bf16"):
        assert case in checked


def test_kd_dram_traffic(kd_rows):
    """Tile form within 1.25x of the minimum; split form at the minimum too, its re-read kept in
    L2 by the plan (<= 22 B/element fp32 with the per-row data at the large shapes)."""
    forms = set()
    for row in kd_rows:
        element = 4 if row["case"].endswith("fp32") else 2
        assert row["min_element_bytes"] == 5 * element  # fwd: read s, t, write grad; bwd: read, write
        forms.add(row["form"])
        if row["form"] == "tile":
            assert row["element_bytes"] == row["min_element_bytes"]
            assert row["bytes"] <= 1.25 * row["min_bytes"], row["case"]
        else:
            assert row["rereads_from_l2"] and row["working_set"] <= kd_kl_div.L2_BUDGET, row["case"]
            assert row["element_bytes"] == row["min_element_bytes"]
            assert row["bytes"] <= 1.01 * row["min_bytes"], row["case"]
        # every launch of the eager path: two forward (tile + reduce; memset + split kernel), one backward
        assert row["kernel_launches"] == len(row["launches"]) == row["forward_launches"] + 1
        assert row["forward_launches"] == 2
        assert [launch["kernel"] for launch in row["launches"][:2]] == (
            ["kd_tile_kernel", "kd_reduce_kernel"] if row["form"] == "tile" else [kd_kl_div.MEMSET, "kd_split_kernel"])
        assert row["launches"][-1]["kernel"] == "kd_scale_kernel"
    assert forms == {"tile", "split"}
    large = {row["case"]: row["bytes"] / row["elements"] for row in kd_rows}
    for case in ("(64, 262144) fp32", "(4096, 32000) fp32"):
        assert large[case] <= 22, (case, large[case])


def test_kd_split_reread_is_dram_when_the_plan_does_not_keep_it_in_l2():
    """The re-read counts as L2 only when the plan's working set fits L2_BUDGET: a chunk of a
    whole 262144-column row (forced) needs the row's 2 MiB a program, far more than L2 holds."""
    logits = torch.empty(64, 262144, device="meta")
    labels = torch.zeros(64, dtype=torch.int64, device="meta")
    tau = torch.ones(262144, device="meta")
    config = dict(kd_kl_div.kd.split_config(64, 262144), CHUNK=262144)
    _, launches = kd_kl_div.kd.plan(logits, logits.clone(), labels, tau, None, 1.0, 1.0, -100, True, False,
                                    form="split", config=config, reduction="mean")
    forced = kd_kl_div.traffic(launches, 64, 262144, 4, 4)
    assert not forced["rereads_from_l2"] and forced["working_set"] > kd_kl_div.L2_BUDGET
    assert forced["element_bytes"] == 28
    planned = kd_kl_div.traffic(kd_kl_div.plan_case(64, 262144, torch.float32), 64, 262144, 4, 4)
    assert planned["rereads_from_l2"] and planned["element_bytes"] == 20
    args = kd_kl_div.split_arguments(kd_kl_div.plan_case(64, 262144, torch.float32)[0])
    # the working set from the plan: (lag + programs) items of a chunk's reads and gradient writes
    assert planned["working_set"] == (args["lag"] + args["programs"]) * args["CHUNK"] * 12


@pytest.mark.parametrize("shape", [(1024, 100), (8, 32000)])
def test_kd_weights_add_bytes_per_row_only(shape):
    """A per-class and a per-row weight: 4 B a row each (read once a row in both forms), nothing per element."""
    launches = kd_kl_div.plan_case(*shape, torch.float32)
    plain = kd_kl_div.traffic(launches, *shape, 4, 4)
    weighted = kd_kl_div.traffic(launches, *shape, 4, 4, weight_tensors=2)
    assert weighted["element_bytes"] == plain["element_bytes"]
    assert weighted["bytes"] - plain["bytes"] == shape[0] * 8
    assert weighted["min_bytes"] - plain["min_bytes"] == shape[0] * 8


def test_kd_variants_fit_registers_without_spills(kd_rows):
    for row in kd_rows:
        for launch in row["launches"]:
            if launch["kernel"] == kd_kl_div.MEMSET:
                continue
            assert launch["registers"] <= 128 and launch["spills"] == 0, (row["case"], launch)
            assert launch["ctas_per_sm"] >= 1
            if launch["kernel"] == "kd_split_kernel":
                # a chunk of several blocks pipelines its column loops; the grid is what the SMs hold at once
                several = "CHUNK=2048" not in launch["blocks"] and "CHUNK=1024" not in launch["blocks"]
                assert launch["num_stages"] in (("3 cp.async", "prefetch") if several else ("1",)), launch
                assert launch["programs"] <= launch["ctas_per_sm"] * hardware.H100.sms, launch


def test_table_prints_every_case(kd_rows, monkeypatch, capsys):
    class Op:
        @staticmethod
        def rows():
            return kd_rows

    monkeypatch.setattr(gpu_model_main, "OPS", (Op,))
    gpu_model_main.main([])
    out = capsys.readouterr().out
    for row in kd_rows:
        assert row["case"] in out
    assert "4 us per launch" in out and "forward + 1 backward" in out and "H200" in out


def test_kd_times_use_achievable_bandwidth_issue_and_host(kd_rows):
    """A call takes at least its DRAM bytes at 90% of the peak and its issued instructions, plus
    4 us a launch; where the host's time per call is given and larger, that."""
    for row in kd_rows:
        assert row["instructions_per_element"] > 0
        for gpu in (hardware.H100, hardware.H200):
            floor = 1e6 * (row["bytes"] / (0.9 * gpu.dram_bytes_per_s) + row["kernel_launches"] * 4e-6)
            assert row["times"][gpu.name] >= floor * (1 - 1e-9), row["case"]
            if row["host_us"] is not None:
                assert row["times"][gpu.name] >= row["host_us"]
            if row["host_us"] is None:  # the GPU's time exactly: a warp instruction issues for 32 threads
                issue = row["instructions_per_element"] * row["elements"] / 32 / (4 * gpu.sms * 1.98e9)
                dram = row["bytes"] / (0.9 * gpu.dram_bytes_per_s)
                want = 1e6 * (max(dram, issue) + row["kernel_launches"] * 4e-6)
                assert row["times"][gpu.name] == pytest.approx(want, rel=1e-9), row["case"]
    host = {row["case"]: row for row in kd_rows if row["host_us"] is not None}
    assert set(host) == {"(128, 10) fp32", "(8, 32000) fp32"}
    assert host["(128, 10) fp32"]["bound"]["H100 SXM"] == "host"  # 30 us of host against ~12 us of GPU


def test_split_kernel_counts_each_item_by_its_own_branch(kd_rows):
    """In the real sm_90 SASS the model finds the item loop's two branches: an item counts less
    than the whole loop (the fallback would count all of it), and a statistics item (reductions,
    partials, its row's combine) more than a gradient item."""
    split = [row for row in kd_rows if row["form"] == "split"]
    assert split
    for row in split:
        items = row["launches"][1]["item_instructions"]
        assert items["gradient"] < items["statistics"] < items["loop"], (row["case"], items)


def test_split_item_instruction_count():
    """Per item: the item loop's body without the other item's branch, the column loop once per
    block, the completing item's combine once per row."""
    def at(index, text):
        return (16 * index, text)

    instructions = [at(0, "MOV R1, R2"),                     # before the item loop
                    at(1, "ISETP.NE.AND P0, PT, R1, R2, PT"),  # the item loop starts: common part
                    at(2, "@!P0 BRA 0x80"),                  # statistics branch: 3..7
                    at(3, "FADD R1, R1, R2"),                # its column loop: 3..4
                    at(4, "@P1 BRA 0x30"),
                    at(5, "@P2 BRA 0xa0"),                   # not the completing item: skip 6..7
                    at(6, "FMUL R1, R1, R2"),
                    at(7, "BRA 0xa0"),                       # the then-block's jump to the join
                    at(8, "FADD R3, R3, R4"),                # gradient branch: 8..9, its column loop 8..9
                    at(9, "@P1 BRA 0x80"),
                    at(10, "@P0 BRA 0x10"),                  # the item loop closes
                    at(11, "EXIT"), at(12, "BRA 0xc0")]
    statistics, gradients, outside = kd_kl_div.split_item_instructions(instructions, blocks_per_chunk=3, n_chunks=4)
    # body 1..10 = 10; statistics: 10 - 2 (gradient branch) - 2 (combine) + 2 / 4 + 2 more passes of 3..4
    assert statistics == 10 - 2 - 2 + 0.5 + 2 * 2
    # gradients: 10 - 5 (statistics branch 3..7) + 2 more passes of 8..9
    assert gradients == 10 - 5 + 2 * 2
    assert outside == 3


def test_sass_loop_count():
    """The hot loop is the longest span a backward branch closes; the final self-branch is no loop."""
    instructions = [(0x00, "MOV R1, R2"), (0x10, "FADD R1, R1, R2"), (0x20, "@P0 BRA 0x10"), (0x30, "EXIT"),
                    (0x40, "BRA 0x40")]
    assert hardware.loop_instructions(instructions) == (2, 5)


def test_the_hardware_model_defines_each_name_once():
    """A name defined twice in hardware.py silently replaces the first (an issue bound 32x off once did)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(hardware.__file__).read_text())
    names = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    names += [target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
              if isinstance(target, ast.Name)]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
