"""GPU model of the fused PGD step (``torch.ops.fastabsld.pgd_step``, csrc/cuda/pgd_step_cuda.cu).

Without a GPU, this module says what the CUDA kernels do on an H100 for the PGD shapes: every
launch one step makes (kernels and the memset of the L2 kernel's counters: kernel, grid, block),
the registers, spills and SASS instruction counts of the compiled sm_90 kernels (read from the
built extension, or any cubin, with ``cuobjdump``), the CTAs per SM that occupancy allows, the
waves on 132 SMs, the DRAM bytes per element against the minimum, and a time per call.

The time of one call is the larger of its host time and its device time (launches are
asynchronous, so the slower side sets the pace of back-to-back steps):
- host: the public function's Python checks and the dispatcher, measured here on a one-element
  CPU call (what the CPU kernel adds to it is a few nanoseconds), plus an assumed host cost per
  launch (``hardware.HOST_LAUNCH_S``);
- device: an assumed gap per launch (``hardware.LAUNCH_OVERHEAD_S``), plus per kernel the larger
  of its DRAM time at the achievable ~90% of the peak bandwidth and its instruction-issue time,
  plus, for the persistent L2 kernel, its waits (two per round of tiles, each an assumed
  ``BARRIER_S``, counted in full although other blocks' loads overlap them).
The issue time counts every non-NOP SASS instruction of a kernel once per tile (a block's pass
through its body) and warp: loops other than the tile loop are unrolled, so no instruction issues
more often than that, and the branches a tile skips (head and tail elements, the scaled sums of
fp64) make it an upper bound.

Assumptions: the H100 SXM of ``benchmarks.gpu_model.hardware`` (its SM limits, 3.35 TB/s).
- Inputs and output 16-byte aligned (fresh tensors are), so every kernel moves 16-byte packs.
- DRAM bytes: the compulsory traffic of each kernel, with no reuse through the 50 MB L2 cache
  between kernels (the large shape moves 0.9 GB per pass); partial sums, per-sample coefficients
  and counters are counted too. An element pass is one read or write of all B*n elements.

The launch plan mirrors ``Launch`` in pgd_step_cuda.cu; the tests check its constants against
the source. ``python -m benchmarks.gpu_model`` prints its table after the KD loss's.
"""

import functools
import glob
import importlib.util
import math
import os
import re
import shutil
import subprocess
import timeit

from benchmarks.gpu_model import hardware

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_SOURCE = os.path.join(ROOT, "csrc", "cuda", "pgd_step_cuda.cu")

SHAPES = ((128, 3, 32, 32), (512, 3, 32, 32), (512, 3, 224, 224))
DTYPES = ("float32", "bfloat16")
NORMS = ("linf", "l2")

# The device.
SMS = hardware.H100.sms
DRAM_BYTES_PER_S = hardware.achievable_dram_bytes_per_s(hardware.H100)
LAUNCH_S = hardware.LAUNCH_OVERHEAD_S
# One wait of the persistent L2 kernel: a block's arrival (an atomic in L2) seen by its sample's
# other blocks, about two L2 round trips. Assumed, not measured.
BARRIER_S = 1e-6

# The kernels' launch constants (pgd_step_cuda.cu).
THREADS = 256
PACKS_PER_THREAD = 4
FUSED_MAX_THREADS = 512
FUSED_PACKS = 4
COOPERATIVE_MIN_BLOCKS = 2
FINALIZE_WARPS = 8
PACK_BYTES = 16
MAX_GRID_Y = 65535

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
CPP_TYPE = {"float32": "float", "bfloat16": "c10::BFloat16", "float16": "c10::Half", "float64": "double"}
ACC_TYPE = {"float32": "float", "bfloat16": "float", "float16": "float", "float64": "double"}
# Bytes of one partial sum of squares: one double, three for fp64 inputs (scaled sums).
PARTIAL_BYTES = {"float": 8, "double": 24}
MEMSET = "memset (counters)"

# Element passes of the L2 step at large samples before the persistent kernel: five kernels
# read grad; x_adv, x, grad; x_adv, x, grad and wrote the output.
PASSES_BEFORE_COOPERATIVE = 8


def _ceil_div(a, b):
    return -(-a // b)


def cooperative_packs(dtype, width):
    """Packs per thread of l2_cooperative_kernel (``cooperative_packs`` in the source)."""
    if width == 8:
        return 2
    return FUSED_PACKS if width > 1 else (4 if dtype == "float64" else 8)


def launch_plan(shape, dtype, norm, resident_blocks=None):
    """The launches of one step, as pgd_step_cuda.cu makes them (aligned tensors, one alpha and
    eps for all samples).

    Args:
        shape: the batch's shape (B, ...).
        dtype: "float32", "bfloat16", "float16" or "float64".
        norm: "linf" or "l2".
        resident_blocks: blocks of l2_cooperative_kernel the GPU holds at once (its CTAs per SM
            times the SMs); default the least its launch bounds allow.

    Returns:
        list of dict: per launch, ``kernel`` (the demangled template name, as cuobjdump shows it
        after c++filt, or ``MEMSET``), ``grid`` (x, y), ``block`` (threads), ``tiles`` (passes of
        a block through the kernel's body, summed over the grid) and ``dram_bytes``.
    """
    batch, n = shape[0], math.prod(shape[1:])
    size = ELEMENT_BYTES[dtype]
    width = PACK_BYTES // size
    cpp, acc = CPP_TYPE[dtype], ACC_TYPE[dtype]
    numel = batch * n
    if norm == "linf":
        blocks = _ceil_div(max(numel // width, 1), THREADS)
        return [{"kernel": f"linf_flat_kernel<{cpp}, {width}>", "grid": (blocks, 1), "block": THREADS,
                 "tiles": blocks, "dram_bytes": 4 * numel * size}]
    if norm != "l2":
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    per_thread_packs = _ceil_div(n // width, FUSED_PACKS)
    fused_threads = max(32, _ceil_div(per_thread_packs, 32) * 32)
    if fused_threads <= FUSED_MAX_THREADS:
        return [{"kernel": f"l2_fused_kernel<{cpp}, {width}, {FUSED_PACKS}>", "grid": (batch, 1),
                 "block": fused_threads, "tiles": batch, "dram_bytes": 4 * numel * size}]
    resident = COOPERATIVE_MIN_BLOCKS * SMS if resident_blocks is None else resident_blocks
    packs = cooperative_packs(dtype, width)
    chunks = max(1, _ceil_div(n // width, THREADS * packs))
    if chunks <= resident:
        counters = batch * 2 * 4
        # Every block of a sample writes its two partials and reads the sample's 2 * chunks; the
        # reads after the first come from L2.
        partials = batch * 2 * chunks * PARTIAL_BYTES[acc] * 2
        tiles = batch * chunks
        return [
            {"kernel": MEMSET, "grid": (0, 0), "block": 0, "tiles": 0, "dram_bytes": counters},
            {"kernel": f"l2_cooperative_kernel<{cpp}, {width}, {packs}>", "grid": (min(tiles, resident), 1),
             "block": THREADS, "tiles": tiles, "chunks": chunks,
             "dram_bytes": 4 * numel * size + partials + counters},
        ]
    chunks = max(1, _ceil_div(n // width, THREADS * PACKS_PER_THREAD))
    grid = (chunks, min(batch, MAX_GRID_Y))
    finalize = (_ceil_div(batch, FINALIZE_WARPS), 1)
    partial = batch * chunks * PARTIAL_BYTES[acc]
    coefficients = batch * 3 * ELEMENT_BYTES["float64" if acc == "double" else "float32"]
    tiles = chunks * batch
    return [
        {"kernel": f"l2_grad_partial_kernel<{cpp}, {width}>", "grid": grid, "block": THREADS, "tiles": tiles,
         "dram_bytes": numel * size + partial},
        {"kernel": f"l2_finalize_kernel<{acc}, false>", "grid": finalize, "block": FINALIZE_WARPS * 32,
         "tiles": finalize[0], "dram_bytes": partial + coefficients},
        {"kernel": f"l2_delta_partial_kernel<{cpp}, {width}>", "grid": grid, "block": THREADS, "tiles": tiles,
         "dram_bytes": 3 * numel * size + partial},
        {"kernel": f"l2_finalize_kernel<{acc}, true>", "grid": finalize, "block": FINALIZE_WARPS * 32,
         "tiles": finalize[0], "dram_bytes": partial + coefficients},
        {"kernel": f"l2_apply_kernel<{cpp}, {width}>", "grid": grid, "block": THREADS, "tiles": tiles,
         "dram_bytes": 4 * numel * size},
    ]


def find_extension():
    """Path of the built fastabsld._C shared object (holds the sm_80 and sm_90 cubins), or None."""
    found = sorted(glob.glob(os.path.join(ROOT, "fastabsld", "_C*.so")))
    return found[0] if found else None


def find_cuobjdump():
    """cuobjdump from a CUDA toolkit (/usr/local/cuda*/bin), the PATH, or Triton's copy; or None."""
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        path = os.path.join(home, "bin", "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            path = os.path.join(base, "backends", "nvidia", "bin", "cuobjdump")
            if os.access(path, os.X_OK):
                return path
    return None


_FUNCTION = re.compile(r"::(\w+<[^()]*>)\(")
_CUBIN_ARCH = re.compile(r"(?:code for|arch =)\s*(sm_\d+)")
# One SASS instruction: "/*0040*/  @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;" -> "LDG".
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def _kernel_name(demangled):
    match = _FUNCTION.search(demangled)
    return match.group(1) if match else demangled


def _demangle(names):
    """Demangles C++ symbol names with c++filt (binutils)."""
    if not shutil.which("c++filt"):
        raise RuntimeError("c++filt (binutils) is needed to read the kernel names")
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def kernel_resources(extension=None, arch="sm_90"):
    """Registers, shared memory, stack, spills, 16-byte accesses and SASS instructions of each
    pgd_step kernel.

    Read from the cubins in the extension (or a cubin of ``nvcc -cubin``):
    ``cuobjdump --dump-resource-usage`` for registers, shared memory and stack; the SASS
    (``cuobjdump -sass``) for spills, counted as local-memory stores and loads (STL / LDL), for
    16-byte global loads and stores (LDG.E.128 / STG.E.128) and for the instructions (all but NOPs).

    Args:
        extension: path of the shared object or cubin (default: the built fastabsld._C).
        arch: the cubin's architecture, "sm_80" or "sm_90".

    Returns:
        dict: kernel name (as in :func:`launch_plan`) -> dict(registers, shared, stack, local,
        spill_stores, spill_loads, wide_loads, wide_stores, instructions); empty when the file
        holds no CUDA kernels for ``arch``.
    """
    extension = extension or find_extension()
    tool = find_cuobjdump()
    if extension is None or tool is None:
        raise RuntimeError(f"needs the built extension ({extension}) and cuobjdump ({tool})")
    return _resources_by_arch(extension, os.path.getmtime(extension), tool).get(arch, {})


def _cuobjdump(tool, *args):
    done = subprocess.run([tool, *args], capture_output=True, text=True)
    # cuobjdump fails on a shared object without device code: no kernels then.
    return done.stdout if done.returncode == 0 else ""


@functools.lru_cache(maxsize=4)
def _resources_by_arch(extension, mtime, tool):
    """kernel_resources for every arch in the extension, read once per build (mtime)."""
    del mtime  # part of the cache key only
    usage = _cuobjdump(tool, "--dump-resource-usage", extension)
    arch, function, records = None, None, []
    for line in usage.splitlines():
        line = line.strip()
        if line.startswith("arch ="):
            arch = line.split("=", 1)[1].strip()
        elif _CUBIN_ARCH.search(line):  # a lone cubin names its arch this way
            arch = _CUBIN_ARCH.search(line).group(1)
        elif line.startswith("Function "):
            function = line[len("Function "):].rstrip(":")
        elif line.startswith("REG:") and function:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
            records.append((arch, function, {"registers": int(fields["REG"]), "shared": int(fields["SHARED"]),
                                             "stack": int(fields["STACK"]), "local": int(fields["LOCAL"])}))
    spills, arch, function = {}, None, None
    for line in _cuobjdump(tool, "-sass", extension).splitlines():
        if line.startswith("arch ="):
            arch = line.split("=", 1)[1].strip()
        elif _CUBIN_ARCH.search(line) and "Function :" not in line:
            arch = _CUBIN_ARCH.search(line).group(1)
        elif "Function :" in line:
            function = (arch, line.split("Function :", 1)[1].strip())
            spills[function] = [0, 0, 0, 0, 0]
        elif function is not None:
            for k, pattern in enumerate((r"\bSTL\b", r"\bLDL\b", r"\bLDG\.E\.128\b", r"\bSTG\.E\.128\b")):
                if re.search(pattern, line):
                    spills[function][k] += 1
            opcode = _SASS_OPCODE.search(line)
            if opcode and opcode.group(1) != "NOP":
                spills[function][4] += 1
    resources = {}
    names = _demangle([function for _, function, _ in records]) if records else []
    for (arch, mangled, record), name in zip(records, names):
        if "fastabsld" not in name:
            continue
        stores, loads, wide_loads, wide_stores, instructions = spills.get((arch, mangled), (0, 0, 0, 0, 0))
        resources.setdefault(arch, {})[_kernel_name(name)] = {
            **record, "spill_stores": stores, "spill_loads": loads, "wide_loads": wide_loads,
            "wide_stores": wide_stores, "instructions": instructions}
    return resources


def ctas_per_sm(threads, registers, shared):
    """CTAs of one kernel resident on one SM (``hardware.ctas_per_sm`` for a block of ``threads``).

    Args:
        threads: threads per CTA.
        registers: registers per thread.
        shared: static shared memory per CTA in bytes.

    Returns:
        int: CTAs per SM.
    """
    return hardware.ctas_per_sm(registers, _ceil_div(threads, 32), shared)[0]


def host_call_us(repeats=2000):
    """Host time of one public ``pgd_step`` call up to its kernel, measured on a one-element CPU
    call (Python checks, dispatcher, autograd and BackendSelect kernels, output allocation); the
    least of five runs.

    Args:
        repeats: calls per run.

    Returns:
        float: microseconds per call.
    """
    import torch

    from fastabsld.ops import pgd_step

    x = torch.full((1, 1), 0.5)
    call = functools.partial(pgd_step, x, x, x, alpha=0.1, eps=0.2, norm="l2")
    return min(timeit.repeat(call, number=repeats, repeat=5)) / repeats * 1e6


def rows(resources=None, host_us=None):
    """One row per PGD shape, dtype and norm: launches, occupancy, waves, bytes and time per call.

    Args:
        resources: kernel resources as :func:`kernel_resources` returns them (default: read from
            the built extension's sm_90 cubin).
        host_us: host time of the public call before its launches (default: :func:`host_call_us`).

    Returns:
        list of dict with the fields ``shape``, ``dtype``, ``norm``, ``kernels_per_step`` (every
        launch: kernels and memsets), ``launches`` (per launch: ``kernel``, ``grid``, ``block``,
        ``tiles``, ``ctas``, ``registers``, ``spill_stores``, ``spill_loads``, ``shared``,
        ``instructions``, ``ctas_per_sm``, ``waves``, ``dram_bytes``, ``dram_us``, ``issue_us``,
        ``sync_us``), ``min_waves`` (over the kernels that move the inputs), ``bytes_per_element``,
        ``min_bytes_per_element`` (read x_adv, x, grad and write the output), ``bytes_over_min``,
        ``element_passes`` (element traffic in passes over B*n elements, per-sample data apart),
        ``element_passes_before`` (the same before the persistent L2 kernel), ``host_us``, ``launch_us``,
        ``dram_us``, ``issue_us``, ``sync_us``, ``device_us`` and ``model_us`` (the larger of host
        and device time).
    """
    resources = kernel_resources() if resources is None else resources
    host_us = host_call_us() if host_us is None else host_us
    table = []
    for shape in SHAPES:
        numel = math.prod(shape)
        for dtype in DTYPES:
            size = ELEMENT_BYTES[dtype]
            for norm in NORMS:
                plan = launch_plan(shape, dtype, norm, _resident_blocks(resources, dtype))
                launches = [_launch_row(launch, resources) for launch in plan]
                dram = sum(launch["dram_bytes"] for launch in launches)
                elements = sum(_element_passes(launch["kernel"]) for launch in plan) * numel * size
                elements_cooperative = any("cooperative" in launch["kernel"] for launch in plan)
                data_kernels = [launch for launch in launches
                                if "finalize" not in launch["kernel"] and launch["kernel"] != MEMSET]
                launch_us = len(launches) * LAUNCH_S * 1e6
                kernel_us = sum(max(launch["dram_us"], launch["issue_us"]) + launch["sync_us"] for launch in launches)
                row_host_us = host_us + len(launches) * hardware.HOST_LAUNCH_S * 1e6
                table.append({
                    "shape": shape, "dtype": dtype, "norm": norm, "kernels_per_step": len(launches),
                    "launches": launches,
                    "min_waves": min(launch["waves"] for launch in data_kernels),
                    "bytes_per_element": dram / numel,
                    "min_bytes_per_element": 4 * size,
                    "bytes_over_min": dram / (numel * 4 * size),
                    "element_passes": elements / (numel * size),
                    "element_passes_before": PASSES_BEFORE_COOPERATIVE if elements_cooperative else elements / (numel * size),
                    "host_us": row_host_us, "launch_us": launch_us,
                    "dram_us": sum(launch["dram_us"] for launch in launches),
                    "issue_us": sum(launch["issue_us"] for launch in launches),
                    "sync_us": sum(launch["sync_us"] for launch in launches),
                    "device_us": launch_us + kernel_us, "model_us": max(row_host_us, launch_us + kernel_us),
                })
    return table


def _element_passes(kernel):
    """Element passes of one kernel of the plan (reads and writes of B*n elements)."""
    for prefix, passes in (("l2_grad_partial", 1), ("l2_delta_partial", 3), ("l2_apply", 4), ("l2_fused", 4),
                           ("linf_", 4), ("l2_cooperative", 4)):
        if kernel.startswith(prefix):
            return passes
    return 0


def _resident_blocks(resources, dtype):
    """CTAs of the vector l2_cooperative_kernel for ``dtype`` that the H100 holds at once."""
    width = PACK_BYTES // ELEMENT_BYTES[dtype]
    name = f"l2_cooperative_kernel<{CPP_TYPE[dtype]}, {width}, {cooperative_packs(dtype, width)}>"
    res = resources.get(name)
    return ctas_per_sm(THREADS, res["registers"], res["shared"]) * SMS if res else None


def _launch_row(launch, resources):
    """A launch of the plan with its resources, occupancy, waves and the three parts of its time."""
    dram_us = launch["dram_bytes"] / DRAM_BYTES_PER_S * 1e6
    if launch["kernel"] == MEMSET:
        return {**launch, "ctas": 0, "registers": 0, "spill_stores": 0, "spill_loads": 0, "shared": 0,
                "instructions": 0, "ctas_per_sm": 0, "waves": 0.0, "dram_us": dram_us, "issue_us": 0.0,
                "sync_us": 0.0}
    res = resources[launch["kernel"]]
    ctas = launch["grid"][0] * launch["grid"][1]
    per_sm = ctas_per_sm(launch["block"], res["registers"], res["shared"])
    warp_instructions = res["instructions"] * launch["tiles"] * _ceil_div(launch["block"], 32)
    rounds = _ceil_div(launch["tiles"], ctas) if "cooperative" in launch["kernel"] else 0
    return {**launch, "ctas": ctas, "registers": res["registers"], "spill_stores": res["spill_stores"],
            "spill_loads": res["spill_loads"], "shared": res["shared"], "instructions": res["instructions"],
            "ctas_per_sm": per_sm, "waves": ctas / (per_sm * SMS) if per_sm else math.inf,
            "dram_us": dram_us, "issue_us": hardware.issue_seconds(warp_instructions) * 1e6,
            "sync_us": 2 * rounds * BARRIER_S * 1e6}


def format_table(table):
    """The rows as a text table, one line per launch."""
    lines = [f"{'shape':>18} {'dtype':>8} {'norm':>4} {'launch':<42} {'grid':>9} {'block':>5} {'reg':>4} "
             f"{'spill':>5} {'SASS':>5} {'cta/SM':>6} {'waves':>6} {'dram us':>8} {'issue us':>8} {'sync us':>7} "
             f"{'passes':>6} {'before':>6} {'host us':>7} {'device us':>9}"]
    for row in table:
        for i, launch in enumerate(row["launches"]):
            head = (f"{str(row['shape']):>18} {row['dtype']:>8} {row['norm']:>4}" if i == 0 else " " * 32)
            tail = (f" {row['element_passes']:6.2f} {row['element_passes_before']:6.0f} {row['host_us']:7.1f} "
                    f"{row['device_us']:9.1f}" if i == 0 else "")
            grid = f"{launch['grid'][0]}x{launch['grid'][1]}" if launch["kernel"] != MEMSET else "-"
            lines.append(f"{head} {launch['kernel']:<42} {grid:>9} {launch['block']:>5} {launch['registers']:>4} "
                         f"{launch['spill_stores'] + launch['spill_loads']:>5} {launch['instructions']:>5} "
                         f"{launch['ctas_per_sm']:>6} {launch['waves']:6.2f} {launch['dram_us']:8.1f} "
                         f"{launch['issue_us']:8.1f} {launch['sync_us']:7.1f}{tail}")
    return "\n".join(lines)


def footer():
    """The lines that say what the PGD table assumes and where its figures come from."""
    return (f"model: a call takes max(host, device). host = the public call measured on a one-element CPU call "
            f"+ {hardware.HOST_LAUNCH_S * 1e6:.1f} us per launch (assumed). device = {LAUNCH_S * 1e6:.0f} us per "
            f"launch (assumed) + per kernel max(DRAM bytes at {DRAM_BYTES_PER_S / 1e12:.2f} TB/s "
            f"({hardware.ACHIEVABLE_FRACTION:.0%} of the {hardware.H100.dram_bytes_per_s / 1e12:.2f} TB/s peak), "
            f"SASS instructions per tile and warp at {hardware.ISSUE_PER_SM_PER_CLOCK} per SM and clock, "
            f"{hardware.CLOCK_HZ / 1e9:.2f} GHz) + {BARRIER_S * 1e6:.0f} us per wait of the persistent L2 kernel "
            f"(assumed, 2 per round); {SMS} SMs (H100 SXM).\n"
            f"passes: element traffic in reads/writes of B*n elements (minimum 4); before: the same before the "
            f"persistent L2 kernel. sm_90 registers, spills and SASS from {find_extension()}")
