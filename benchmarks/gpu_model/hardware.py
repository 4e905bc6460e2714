"""GPU facts, occupancy, waves and roofline arithmetic shared by the per-op models.

Figures for the H100 SXM (compute capability 9.0) from NVIDIA's published limits: 132 SMs,
64K 32-bit registers, 2048 threads, 32 CTAs and 228 KB of shared memory per SM (227 KB usable
by one CTA, 1 KB reserved per CTA), registers allocated per warp in units of 256, ~3.35 TB/s of
HBM3 and 50 MB of L2. The H200 is the same chip with 4.8 TB/s of HBM3e.
"""

import dataclasses
import math
import os
import re
import subprocess
import tempfile

import triton

from tests.triton_aot import compile_launches

KIB = 1024
MIB = 1024 * 1024
# What one kernel launch costs beyond its memory traffic (launch latency, tail and ramp-up):
# a round figure for small back-to-back launches, assumed, not measured.
LAUNCH_OVERHEAD_S = 4e-6
# The share of peak DRAM bandwidth a well-made streaming kernel reaches (the best row-wise
# softmax and cross-entropy kernels reach ~90% of HBM on an H100).
ACHIEVABLE_FRACTION = 0.9
# Warp instructions an SM issues per clock (4 schedulers, one each), and the H100 SXM's boost
# clock: the issue bound these give is a lower bound on a kernel's time.
ISSUE_PER_SM_PER_CLOCK = 4
CLOCK_HZ = 1.98e9


@dataclasses.dataclass(frozen=True)
class GPU:
    """The limits of one GPU that the model uses."""

    name: str
    sms: int
    dram_bytes_per_s: float
    l2_bytes: int
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    ctas_per_sm: int = 32
    shared_per_sm: int = 228 * KIB
    shared_reserved_per_cta: int = KIB
    register_unit: int = 256
    shared_unit: int = 128


H100 = GPU("H100 SXM", 132, 3.35e12, 50 * MIB)
H200 = GPU("H200 SXM", 132, 4.8e12, 50 * MIB)


def ctas_per_sm(registers, num_warps, shared_bytes, gpu=H100):
    """CTAs of a kernel one SM holds at once, and what limits them.

    Args:
        registers: registers per thread of the compiled kernel.
        num_warps: warps per CTA.
        shared_bytes: shared memory per CTA (static and dynamic, without the reserved 1 KB).
        gpu: the GPU.

    Returns:
        tuple: (CTAs, limiter) with limiter one of "registers", "threads", "ctas", "shared".
    """
    per_warp = math.ceil(max(registers, 1) * 32 / gpu.register_unit) * gpu.register_unit
    limits = {
        "registers": (gpu.registers_per_sm // per_warp) // num_warps,
        "threads": gpu.threads_per_sm // (32 * num_warps),
        "ctas": gpu.ctas_per_sm,
        "shared": gpu.shared_per_sm // (math.ceil((shared_bytes + gpu.shared_reserved_per_cta) / gpu.shared_unit)
                                        * gpu.shared_unit),
    }
    limiter = min(limits, key=lambda k: limits[k])
    return limits[limiter], limiter


def waves(programs, gpu=H100):
    """Programs per SM (a 'wave' is one program on every SM).

    Args:
        programs: CTAs in the grid.
        gpu: the GPU.

    Returns:
        float: programs / SMs.
    """
    return programs / gpu.sms


def roofline_seconds(nbytes, launches, gpu=H100, launch_overhead_s=LAUNCH_OVERHEAD_S):
    """Time that moving ``nbytes`` at the DRAM peak and ``launches`` launch overheads take.

    Args:
        nbytes: DRAM bytes.
        launches: kernel launches.
        gpu: the GPU.
        launch_overhead_s: seconds per launch.

    Returns:
        float: seconds.
    """
    return nbytes / gpu.dram_bytes_per_s + launches * launch_overhead_s


def achievable_seconds(nbytes, gpu=H100):
    """Time that moving ``nbytes`` at ACHIEVABLE_FRACTION of the DRAM peak takes.

    Args:
        nbytes: DRAM bytes.
        gpu: the GPU.

    Returns:
        float: seconds.
    """
    return nbytes / (ACHIEVABLE_FRACTION * gpu.dram_bytes_per_s)


def issue_seconds(warp_instructions, gpu=H100):
    """Time the SMs need to issue ``warp_instructions`` (one per scheduler and clock, all SMs busy).

    Args:
        warp_instructions: warp instructions a kernel executes (thread instructions / 32).
        gpu: the GPU.

    Returns:
        float: seconds.
    """
    return warp_instructions / (gpu.sms * ISSUE_PER_SM_PER_CLOCK * CLOCK_HZ)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")


def sass_instructions(cubin):
    """The SASS instructions of a cubin (``cuobjdump -sass``, the one Triton ships): (address, text) pairs.

    Args:
        cubin: the cubin's bytes.

    Returns:
        list: (int address, str instruction) in address order.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        done = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True,
                              check=True)
    return [(int(m.group(1), 16), m.group(2)) for m in map(_SASS_LINE.search, done.stdout.splitlines()) if m]


INSTRUCTION_BYTES = 16  # an sm_90 instruction


def loop_spans(instructions):
    """Every loop: the (first, last) addresses of the span that a backward branch at ``last`` to
    ``first`` closes (the final self-branch is not one).

    Args:
        instructions: ``sass_instructions``'s list.

    Returns:
        list[tuple[int, int]]: the spans, in address order of their branches.
    """
    spans = []
    for address, text in instructions:
        found = BRANCH.search(text)
        if found and int(found.group(1), 16) < address:
            spans.append((int(found.group(1), 16), address))
    return spans


def span_instructions(span):
    """Instructions in a (first, last) address span, both included.

    Args:
        span: (first, last) addresses.

    Returns:
        int: instructions.
    """
    return (span[1] - span[0]) // INSTRUCTION_BYTES + 1


def loop_instructions(instructions):
    """Instructions of the innermost-to-outermost hot loop: the longest span a backward branch closes.

    Args:
        instructions: ``sass_instructions``'s list.

    Returns:
        tuple: (instructions in the loop body or 0 when there is no loop, instructions in all).
    """
    return max(map(span_instructions, loop_spans(instructions)), default=0), len(instructions)


def compile_for_sm90(launches):
    """The sm_90 variant each launch compiles (``tests.triton_aot``): registers, spills, shared memory.

    Args:
        launches: objects with kernel, args, constexprs and options() (a kernel module's plan).

    Returns:
        list: per launch, a dict with registers, spills (stack + local bytes per thread), shared
        (bytes per CTA, static + dynamic), num_warps, num_stages and the PTX.
    """
    compiled = []
    for result in compile_launches(launches, targets=(90,)):
        kernel = result[90]
        resources = kernel.resources
        compiled.append({"registers": resources["registers"], "spills": resources["stack"] + resources["local"],
                         "shared": resources["shared"] + kernel.metadata["shared"],
                         "num_warps": kernel.metadata["num_warps"], "num_stages": kernel.metadata["num_stages"],
                         "ptx": kernel.asm["ptx"], "cubin": kernel.asm["cubin"]})
    return compiled


def launch_row(kernel, programs, num_warps, blocks, num_stages, compiled, gpu=H100):
    """The model's line for one launch.

    Args:
        kernel: the kernel's name.
        programs: CTAs in its grid.
        num_warps: warps per CTA.
        blocks: its block sizes as text (e.g. "BLOCK_M=4 BLOCK_N=128 VEC=4").
        num_stages: software pipeline stages ("1" or e.g. "3 cp.async", "prefetch").
        compiled: ``compile_for_sm90``'s dict for it.
        gpu: the GPU.

    Returns:
        dict: kernel, programs, num_warps, blocks, num_stages, registers, spills, shared,
        ctas_per_sm, limiter, waves (programs per SM) and resident (the fraction of the grid
        that is resident at once, 1.0 when the whole grid fits).
    """
    ctas, limiter = ctas_per_sm(compiled["registers"], num_warps, compiled["shared"], gpu)
    return {"kernel": kernel, "programs": programs, "num_warps": num_warps, "blocks": blocks,
            "num_stages": num_stages, "registers": compiled["registers"], "spills": compiled["spills"],
            "shared": compiled["shared"], "ctas_per_sm": ctas, "limiter": limiter,
            "waves": waves(programs, gpu), "resident": min(1.0, ctas * gpu.sms / programs)}


def time_columns(row, gpus=(H100, H200)):
    """Roofline times of a case row (``bytes`` and ``kernel_launches``) in microseconds per GPU.

    Args:
        row: an op module's case dict.
        gpus: the GPUs.

    Returns:
        dict: ``{gpu name: microseconds}``.
    """
    return {gpu.name: 1e6 * roofline_seconds(row["bytes"], row["kernel_launches"], gpu) for gpu in gpus}


def format_rows(rows):
    """The model's table: per case a header line, one line per launch, a traffic and time line.

    Args:
        rows: case dicts from the op modules' ``rows()``.

    Returns:
        str: the table.
    """
    lines = [f"assumed: {H100.name} {H100.sms} SMs {H100.dram_bytes_per_s / 1e12:.2f} TB/s, "
             f"{H200.name} {H200.dram_bytes_per_s / 1e12:.2f} TB/s, "
             f"{LAUNCH_OVERHEAD_S * 1e6:.0f} us per launch; waves = programs / {H100.sms} SMs; "
             "times: a row's own times (see its model) where it gives them, else DRAM at the peak; "
             "registers and spills of the sm_90 cubin; CTAs/SM from registers, threads, CTAs and shared memory"]
    for row in rows:
        lines.append("")
        lines.append(f"{row['op']} {row['case']}  (largest input {row['logit_bytes'] / KIB:.0f} KiB)")
        for launch in row["launches"]:
            lines.append(f"  {launch['kernel']:<24} grid {launch['programs']:>6}  warps {launch['num_warps']:>2}  "
                         f"{launch['blocks']:<40} stages {launch['num_stages']:<10} "
                         f"regs {launch['registers']:>3} spills {launch['spills']:>2}B  "
                         f"smem {launch['shared'] / KIB:5.1f}KiB  CTAs/SM {launch['ctas_per_sm']:>2} "
                         f"({launch['limiter']})  waves {launch['waves']:6.2f}")
        times = row.get("times") or time_columns(row)
        per_element = row["bytes"] / row["elements"]
        lines.append(f"  DRAM {per_element:5.2f} B/elem (elements {row['element_bytes']:.0f}, minimum "
                     f"{row['min_element_bytes']:.0f}; x{row['bytes'] / row['min_bytes']:.2f} of the minimum "
                     f"with per-row data)  launches {row['kernel_launches']}  "
                     + "  ".join(f"{name} {us:8.1f} us" for name, us in times.items()))
        if row.get("notes"):
            lines.append(f"  {row['notes']}")
    return "\n".join(lines)


# ---- Achievable rates and host cost ------------------------------------------------------------
# Host (CPU) time of one launch call (cudaLaunchKernel, cudaMemsetAsync): assumed, not measured.
HOST_LAUNCH_S = 2.5e-6


def achievable_dram_bytes_per_s(gpu=H100):
    """DRAM bytes per second a streaming kernel reaches: ``ACHIEVABLE_FRACTION`` of the peak.

    Args:
        gpu: the GPU.

    Returns:
        float: bytes per second.
    """
    return gpu.dram_bytes_per_s * ACHIEVABLE_FRACTION
