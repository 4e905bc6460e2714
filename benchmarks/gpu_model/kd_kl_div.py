"""Model of the fused KD loss (``fastabsld.kernels.kd_kl_div``) at the benchmark's shapes.

The case is the ABSLD use of ``benchmarks/bench_kd_kl_div.py``: per-class teacher temperatures
gathered by label, "mean" reduction, the student's gradient only, forward and backward, on the
eager CUDA path (``fastabsld.ops.kd_loss_triton``). The launches are every launch that path
makes for (B, C) logits on a 132-SM GPU (meta tensors: nothing runs): the row kernel(s), the
finishing kernel that reduces the rows (``kd_reduce_kernel``), and the backward's one scaling
kernel (``kd_scale_kernel``). Nothing else runs on the device.

DRAM bytes counted (e_s, e_t: element sizes of the student and teacher logits; g: the stored
gradient's, e_s, or 4 for fp16 logits, whose gradient is kept in fp32 until scaled):

* forward, tile form: read s and t, write the stored gradient: e_s + e_t + g per element.
* forward, split form: the statistics pass reads s and t, the finish pass reads them again and
  writes the gradient: 2 (e_s + e_t) + g per element. The second read is counted as DRAM: L2
  holds it only while both inputs fit in it, which the notes give per case.
* backward: the scaling kernel reads the stored gradient and writes the logits' gradient:
  g + e_s per element, one launch.
* per row: label (8 B), gathered temperature (4 B) and loss (4 B) per kernel that touches the
  row; the finishing kernel reads each row's loss and label again (12 B); the split form's 6
  fp32 partials per (row, chunk) are written once and read once from DRAM (their repeated reads
  by the row's other chunks hit L2). A weighted call (``weight_tensors``) adds 4 B per row per
  weight tensor, in the tile kernel or in each (row, chunk) program of the split form's finish
  kernel: bytes per row, none per element.

The minimum is one read of each input, one write of the gradient and the backward's read and
write: fp32 20 B/element, bf16 10 B/element.

Time per call, per GPU: the GPU's time is the larger of the DRAM time at ACHIEVABLE_FRACTION
(90%) of the peak and the instruction-issue bound (SASS instructions of each sm_90 cubin: the hot
loop's per iteration, counted once per iteration a program makes, the rest once a program; 4 warp
instructions a clock per SM at the boost clock), plus LAUNCH_OVERHEAD_S per launch. The host's
time is the eager path's per forward + backward call, from ``benchmarks.kd_host_cost`` (measured
on this machine's CPU with Triton's launch recorded, when given). Launches are asynchronous, so a
call costs the larger of the two.
"""

import torch

from benchmarks.gpu_model import hardware
from fastabsld.kernels import kd_kl_div as kd

SHAPES = ((128, 10), (1024, 100), (256, 1000), (8, 32000), (64, 262144), (4096, 32000))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROW_BYTES = 8 + 4 + 4   # label, gathered temperature, loss
REDUCE_ROW_BYTES = 4 + 8  # the finishing kernel reads each row's loss and label
WEIGHT_ROW_BYTES = 4    # one fp32 weight (gathered per class, or per row) per weight tensor


def plan_case(batch, num_classes, dtype):
    """Every launch of the eager path for the benchmark's call at (B, C) in ``dtype``: forward and backward.

    Args:
        batch: B.
        num_classes: C.
        dtype: the logits' dtype (student and teacher).

    Returns:
        list: ``kd.Launch`` objects, the forward's then the backward's.
    """
    logits = torch.empty(batch, num_classes, dtype=dtype, device="meta")
    labels = torch.empty(batch, dtype=torch.int64, device="meta")
    tau = torch.empty(num_classes, dtype=torch.float32, device="meta")
    stored = torch.float32 if dtype == torch.float16 else dtype
    (_, grad, _), launches = kd.plan(logits, logits.clone(), labels, tau, None, 1.0, 1.0, -100, True, False,
                                     reduction="mean", grad_dtypes=(stored, dtype))
    backward = kd.scale_plan(grad, torch.empty((), device="meta"), torch.empty(1, device="meta"), dtype)
    return launches + backward


def traffic(launches, batch, num_classes, student_bytes, teacher_bytes, weight_tensors=0, stored_bytes=None):
    """DRAM bytes of the forward launches and the backward, and their minimum.

    Args:
        launches: the call's launches (``plan_case``), the forward's row kernel first.
        batch: B.
        num_classes: C.
        student_bytes: e_s.
        teacher_bytes: e_t.
        weight_tensors: weight tensors the call passes (0, 1 or 2; a number weight moves nothing).
        stored_bytes: g, the stored gradient's element size (default e_s).

    Returns:
        dict: bytes, min_bytes (totals), element_bytes and min_element_bytes (per element,
        without the per-row bytes).
    """
    stored = student_bytes if stored_bytes is None else stored_bytes
    reads = student_bytes + teacher_bytes
    minimum_elements = reads + 3 * student_bytes
    element_bytes = reads + 2 * stored + student_bytes
    weight_bytes = weight_tensors * WEIGHT_ROW_BYTES
    if launches[0].kernel is kd._kd_tile_kernel:
        row_bytes = ROW_BYTES + weight_bytes
    else:
        n_chunks = launches[0].args[launches[0].kernel.arg_names.index("n_chunks")]
        element_bytes += reads
        row_bytes = 2 * ROW_BYTES + 2 * kd.N_PARTIALS * 4 * n_chunks + weight_bytes * n_chunks
    elements = batch * num_classes
    rows = batch * (row_bytes + REDUCE_ROW_BYTES)
    return {"bytes": elements * element_bytes + rows,
            "min_bytes": elements * minimum_elements + batch * (ROW_BYTES + weight_bytes),
            "element_bytes": element_bytes, "min_element_bytes": minimum_elements, "elements": elements}


def _iterations(launch):
    """Hot-loop iterations one program of ``launch`` makes (1 for a kernel without a loop)."""
    args = dict(zip(launch.kernel.arg_names, launch.args))
    name = _name(launch)
    if name == "_kd_reduce_kernel":
        return -(-args["B"] // launch.constexprs["BLOCK"])
    if name in ("_kd_split_stats_kernel", "_kd_split_finish_kernel"):
        blocks = -(-args["C"] // launch.constexprs["BLOCK_N"])
        return -(-blocks // args["n_chunks"])
    return 1


def issue(launch, compiled):
    """Instructions ``launch`` issues (summed over threads) by its sm_90 SASS, statically counted.

    Args:
        launch: a ``kd.Launch``.
        compiled: ``hardware.compile_for_sm90``'s dict for it.

    Returns:
        float: thread instructions.
    """
    loop, total = hardware.loop_instructions(hardware.sass_instructions(compiled["cubin"]))
    per_program = (total - loop) + loop * _iterations(launch)
    return per_program * launch.grid[0] * 32 * launch.num_warps


def _name(launch):
    return launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else launch.kernel.__name__


def _describe(launch, compiled):
    name = _name(launch)
    sizes = " ".join(f"{k}={int(v)}" for k, v in launch.constexprs.items()
                     if k in ("BLOCK_M", "BLOCK_N", "VEC", "WIDE", "BLOCK"))
    if name in ("_kd_split_stats_kernel", "_kd_split_finish_kernel"):
        args = dict(zip(launch.kernel.arg_names, launch.args))
        sizes += f" CHUNK={args['blocks_per_chunk'] * launch.constexprs['BLOCK_N']} chunks={args['n_chunks']}"
    if launch.constexprs.get("PREFETCH"):
        stages = "prefetch"
    elif launch.num_stages > 1:
        stages = f"{launch.num_stages} cp.async" if "cp.async" in compiled["ptx"] else f"{launch.num_stages} (none)"
    else:
        stages = "1"
    return hardware.launch_row(name.strip("_"), launch.grid[0], launch.num_warps, sizes, stages, compiled)


def measured_host_us():
    """Host time per forward + backward call of the eager path at ``kd_host_cost.SHAPES`` (fp32).

    Returns:
        dict or None: ``{(B, C): microseconds}``; None under the Triton interpreter (nothing compiles).
    """
    from benchmarks import kd_host_cost

    if kd_host_cost.interpreted():
        return None
    return {shape: sum(kd_host_cost.measure(*shape, calls=200, repeats=5)[key] for key in ("forward_us", "backward_us"))
            for shape in kd_host_cost.SHAPES}


def rows(shapes=SHAPES, dtypes=tuple(DTYPES), host_us="measure"):
    """One case dict per (shape, dtype) (see ``benchmarks.gpu_model`` for the keys).

    Args:
        shapes: (B, C) pairs.
        dtypes: names in DTYPES.
        host_us: ``{(B, C): microseconds}`` of host time per forward + backward call, from
            ``benchmarks.kd_host_cost`` (fp32), None, or "measure" (``measured_host_us``).

    Returns:
        list: the case dicts; ``times`` holds each GPU's time per call in microseconds.
    """
    if host_us == "measure":
        host_us = measured_host_us()
    cases = [(shape, name, plan_case(*shape, DTYPES[name])) for shape in shapes for name in dtypes]
    compiled = iter(hardware.compile_for_sm90([launch for _, _, launches in cases for launch in launches]))
    out = []
    for (batch, num_classes), name, launches in cases:
        element = DTYPES[name].itemsize
        compiled_case = [next(compiled) for _ in launches]
        row = {"op": "kd_kl_div fwd+bwd", "case": f"({batch}, {num_classes}) {name}",
               "logit_bytes": batch * num_classes * element,
               "form": "tile" if launches[0].kernel is kd._kd_tile_kernel else "split",
               "launches": [_describe(launch, c) for launch, c in zip(launches, compiled_case)],
               "kernel_launches": len(launches),
               "forward_launches": len(launches) - 1, "backward_launches": 1}
        row.update(traffic(launches, batch, num_classes, element, element))
        instructions = [issue(launch, c) for launch, c in zip(launches, compiled_case)]
        for launch, count in zip(row["launches"], instructions):
            launch["instructions_per_element"] = count / row["elements"]
        row["instructions_per_element"] = sum(instructions) / row["elements"]
        host = None if host_us is None or name != "fp32" else host_us.get((batch, num_classes))
        row["host_us"] = host
        row["times"] = {}
        for gpu in (hardware.H100, hardware.H200):
            memory = hardware.achievable_seconds(row["bytes"], gpu)
            issued = sum(hardware.issue_seconds(count / 32, gpu) for count in instructions)  # thread -> warp
            gpu_us = 1e6 * (max(memory, issued) + len(launches) * hardware.LAUNCH_OVERHEAD_S)
            row["times"][gpu.name] = gpu_us if host is None else max(gpu_us, host)
            row.setdefault("bound", {})[gpu.name] = ("host" if host is not None and host > gpu_us else
                                                     "issue" if issued > memory else "DRAM")
        inputs = 2 * batch * num_classes * element
        notes = (f"launches: {row['forward_launches']} forward + 1 backward (all of the eager path); "
                 f"{row['instructions_per_element']:.0f} SASS instructions/element; bound: "
                 + ", ".join(f"{gpu} {bound}" for gpu, bound in row["bound"].items()))
        if host is not None:
            notes += f"; host {host:.0f} us a call"
        if row["form"] == "split":
            fits = "fit in" if inputs <= hardware.H100.l2_bytes else "exceed"
            notes += (f"; split: the inputs ({inputs / hardware.MIB:.1f} MiB) {fits} the 50 MB L2, "
                      "the re-read is counted as DRAM")
        row["notes"] = notes
        out.append(row)
    return out
