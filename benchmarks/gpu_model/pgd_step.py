"""GPU model of the fused PGD step (``torch.ops.fastabsld.pgd_step``, csrc/cuda/pgd_step_cuda.cu).

Without a GPU, this module says what the CUDA kernels do on an H100 for the PGD shapes: the
launches each step makes (kernel, grid, block), the registers and spills of the compiled sm_90
kernels (read from the built extension with ``cuobjdump``), the CTAs per SM that occupancy
allows, the waves on 132 SMs, the DRAM bytes per element against the minimum, and the time that
the bytes and the launches alone would take.

Assumptions: the H100 SXM of ``benchmarks.gpu_model.hardware`` (its SM limits, 3.35 TB/s and 4 us
per launch). Modelled time = launches * 4 us + DRAM bytes / 3.35 TB/s: a floor that ignores
latency and tail effects, which dominate well below a few waves.
- Inputs and output 16-byte aligned (fresh tensors are), so every kernel moves 16-byte packs.
- DRAM bytes: the compulsory traffic of each kernel, with no reuse through the 50 MB L2 cache
  between kernels (the large shape moves 0.9 GB per pass); the partial sums and per-sample
  coefficients of the multi-kernel L2 path are counted too.

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

from benchmarks.gpu_model import hardware

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_SOURCE = os.path.join(ROOT, "csrc", "cuda", "pgd_step_cuda.cu")

SHAPES = ((128, 3, 32, 32), (512, 3, 32, 32), (512, 3, 224, 224))
DTYPES = ("float32", "bfloat16")
NORMS = ("linf", "l2")

# The device.
SMS = hardware.H100.sms
DRAM_BYTES_PER_S = hardware.H100.dram_bytes_per_s
LAUNCH_S = hardware.LAUNCH_OVERHEAD_S

# The kernels' launch constants (pgd_step_cuda.cu).
THREADS = 256
PACKS_PER_THREAD = 4
FUSED_MAX_THREADS = 512
FUSED_PACKS = 4
FINALIZE_WARPS = 8
PACK_BYTES = 16
MAX_GRID_Y = 65535

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
CPP_TYPE = {"float32": "float", "bfloat16": "c10::BFloat16", "float16": "c10::Half", "float64": "double"}
ACC_TYPE = {"float32": "float", "bfloat16": "float", "float16": "float", "float64": "double"}
# Bytes of one partial sum of squares: one double, three for fp64 inputs (scaled sums).
PARTIAL_BYTES = {"float": 8, "double": 24}

# Element passes of DRAM traffic of the kernels before the three-pass L2 step: L-inf read
# x_adv, x, grad and wrote the output; L2 read all three for the expanded sums, then again to
# write the output.
PASSES_BEFORE = {"linf": 4, "l2": 7}


def _ceil_div(a, b):
    return -(-a // b)


def launch_plan(shape, dtype, norm):
    """The kernel launches of one step, as pgd_step_cuda.cu makes them (aligned tensors, one
    alpha and eps for all samples).

    Args:
        shape: the batch's shape (B, ...).
        dtype: "float32", "bfloat16", "float16" or "float64".
        norm: "linf" or "l2".

    Returns:
        list of dict: per launch, ``kernel`` (the demangled template name, as cuobjdump shows it
        after c++filt), ``grid`` (x, y), ``block`` (threads) and ``dram_bytes``.
    """
    batch, n = shape[0], math.prod(shape[1:])
    size = ELEMENT_BYTES[dtype]
    width = PACK_BYTES // size
    cpp, acc = CPP_TYPE[dtype], ACC_TYPE[dtype]
    numel = batch * n
    if norm == "linf":
        blocks = _ceil_div(max(numel // width, 1), THREADS)
        return [{"kernel": f"linf_flat_kernel<{cpp}, {width}>", "grid": (blocks, 1), "block": THREADS,
                 "dram_bytes": 4 * numel * size}]
    if norm != "l2":
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    per_thread_packs = _ceil_div(n // width, FUSED_PACKS)
    fused_threads = max(32, _ceil_div(per_thread_packs, 32) * 32)
    if fused_threads <= FUSED_MAX_THREADS:
        return [{"kernel": f"l2_fused_kernel<{cpp}, {width}, {FUSED_PACKS}>", "grid": (batch, 1),
                 "block": fused_threads, "dram_bytes": 4 * numel * size}]
    chunks = max(1, _ceil_div(n // width, THREADS * PACKS_PER_THREAD))
    grid = (chunks, min(batch, MAX_GRID_Y))
    finalize = (_ceil_div(batch, FINALIZE_WARPS), 1)
    partial = batch * chunks * PARTIAL_BYTES[acc]
    coefficients = batch * 3 * ELEMENT_BYTES["float64" if acc == "double" else "float32"]
    return [
        {"kernel": f"l2_grad_partial_kernel<{cpp}, {width}>", "grid": grid, "block": THREADS,
         "dram_bytes": numel * size + partial},
        {"kernel": f"l2_finalize_kernel<{acc}, false>", "grid": finalize, "block": FINALIZE_WARPS * 32,
         "dram_bytes": partial + coefficients},
        {"kernel": f"l2_delta_partial_kernel<{cpp}, {width}>", "grid": grid, "block": THREADS,
         "dram_bytes": 3 * numel * size + partial},
        {"kernel": f"l2_finalize_kernel<{acc}, true>", "grid": finalize, "block": FINALIZE_WARPS * 32,
         "dram_bytes": partial + coefficients},
        {"kernel": f"l2_apply_kernel<{cpp}, {width}>", "grid": grid, "block": THREADS,
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
    """Registers, shared memory, stack, spills and 16-byte accesses of each pgd_step kernel.

    Read from the cubins in the extension: ``cuobjdump --dump-resource-usage`` for registers,
    shared memory and stack; the SASS (``cuobjdump -sass``) for spills, counted as local-memory
    stores and loads (STL / LDL), and for 16-byte global loads and stores (LDG.E.128 / STG.E.128).

    Args:
        extension: path of the shared object (default: the built fastabsld._C).
        arch: the cubin's architecture, "sm_80" or "sm_90".

    Returns:
        dict: kernel name (as in :func:`launch_plan`) -> dict(registers, shared, stack, local,
        spill_stores, spill_loads, wide_loads, wide_stores); empty when the extension holds no
        CUDA kernels.
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
        elif "Function :" in line:
            function = (arch, line.split("Function :", 1)[1].strip())
            spills[function] = [0, 0, 0, 0]
        elif function is not None:
            for k, pattern in enumerate((r"\bSTL\b", r"\bLDL\b", r"\bLDG\.E\.128\b", r"\bSTG\.E\.128\b")):
                if re.search(pattern, line):
                    spills[function][k] += 1
    resources = {}
    names = _demangle([function for _, function, _ in records]) if records else []
    for (arch, mangled, record), name in zip(records, names):
        if "fastabsld" not in name:
            continue
        stores, loads, wide_loads, wide_stores = spills.get((arch, mangled), (0, 0, 0, 0))
        resources.setdefault(arch, {})[_kernel_name(name)] = {
            **record, "spill_stores": stores, "spill_loads": loads, "wide_loads": wide_loads,
            "wide_stores": wide_stores}
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


def rows(resources=None):
    """One row per PGD shape, dtype and norm: launches, occupancy, waves, bytes and modelled time.

    Args:
        resources: kernel resources as :func:`kernel_resources` returns them (default: read from
            the built extension's sm_90 cubin).

    Returns:
        list of dict with the fields ``shape``, ``dtype``, ``norm``, ``kernels_per_step``,
        ``launches`` (per kernel: ``kernel``, ``grid``, ``block``, ``ctas``, ``registers``,
        ``spill_stores``, ``spill_loads``, ``shared``, ``ctas_per_sm``, ``waves``, ``dram_bytes``),
        ``min_waves`` (over the kernels that move the inputs), ``bytes_per_element``,
        ``min_bytes_per_element`` (read x_adv, x, grad and write the output),
        ``bytes_over_min``, ``bytes_per_element_before`` (the kernels before the three-pass L2
        step), ``launch_us`` and ``dram_us`` (the modelled time's two parts), ``model_us`` and
        ``assumed_launch_us``.
    """
    resources = kernel_resources() if resources is None else resources
    table = []
    for shape in SHAPES:
        numel = math.prod(shape)
        for dtype in DTYPES:
            size = ELEMENT_BYTES[dtype]
            for norm in NORMS:
                launches = []
                for launch in launch_plan(shape, dtype, norm):
                    res = resources[launch["kernel"]]
                    ctas = launch["grid"][0] * launch["grid"][1]
                    per_sm = ctas_per_sm(launch["block"], res["registers"], res["shared"])
                    launches.append({**launch, "ctas": ctas, "registers": res["registers"],
                                     "spill_stores": res["spill_stores"], "spill_loads": res["spill_loads"],
                                     "shared": res["shared"], "ctas_per_sm": per_sm,
                                     "waves": ctas / (per_sm * SMS) if per_sm else math.inf})
                dram = sum(launch["dram_bytes"] for launch in launches)
                data_kernels = [launch for launch in launches if "finalize" not in launch["kernel"]]
                launch_us = len(launches) * LAUNCH_S * 1e6
                dram_us = dram / DRAM_BYTES_PER_S * 1e6
                table.append({
                    "shape": shape, "dtype": dtype, "norm": norm, "kernels_per_step": len(launches),
                    "launches": launches,
                    "min_waves": min(launch["waves"] for launch in data_kernels),
                    "bytes_per_element": dram / numel,
                    "min_bytes_per_element": 4 * size,
                    "bytes_over_min": dram / (numel * 4 * size),
                    "bytes_per_element_before": PASSES_BEFORE[norm] * size,
                    "launch_us": launch_us, "dram_us": dram_us, "model_us": launch_us + dram_us,
                    "assumed_launch_us": LAUNCH_S * 1e6,
                })
    return table


def format_table(table):
    """The rows as a text table, one line per launch."""
    lines = [f"{'shape':>18} {'dtype':>8} {'norm':>4} {'kernel':<44} {'grid':>13} {'block':>5} {'reg':>4} "
             f"{'spill':>5} {'cta/SM':>6} {'waves':>7} {'B/elem':>6} {'min':>4} {'before':>6} {'model us':>9}"]
    for row in table:
        for i, launch in enumerate(row["launches"]):
            head = (f"{str(row['shape']):>18} {row['dtype']:>8} {row['norm']:>4}" if i == 0 else " " * 32)
            tail = (f" {row['bytes_per_element']:6.2f} {row['min_bytes_per_element']:4d} "
                    f"{row['bytes_per_element_before']:6d} {row['model_us']:9.1f}" if i == 0 else "")
            grid = f"{launch['grid'][0]}x{launch['grid'][1]}"
            lines.append(f"{head} {launch['kernel']:<44} {grid:>13} {launch['block']:>5} {launch['registers']:>4} "
                         f"{launch['spill_stores'] + launch['spill_loads']:>5} {launch['ctas_per_sm']:>6} "
                         f"{launch['waves']:7.2f}{tail}")
    return "\n".join(lines)


def footer():
    """The line that says what the PGD table assumes and where its registers come from."""
    return (f"model: {LAUNCH_S * 1e6:.0f} us per launch + DRAM bytes at {DRAM_BYTES_PER_S / 1e12:.2f} TB/s, "
            f"{SMS} SMs (H100 SXM); sm_90 registers and spills from {find_extension()}")
