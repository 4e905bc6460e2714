"""Model of the fused KD loss (``fastabsld.kernels.kd_kl_div``) at the benchmark's shapes.

The case is the ABSLD use of ``benchmarks/bench_kd_kl_div.py``: per-class teacher temperatures
gathered by label, "mean" reduction, the student's gradient only, forward and backward, on the
eager CUDA path (``fastabsld.ops.kd_loss_triton``). The launches are every launch that path
makes for (B, C) logits on a 132-SM GPU (meta tensors: nothing runs): the tile form's row kernel
and the finishing kernel that reduces the rows (``kd_reduce_kernel``); the split form's memset
of its work counters (``torch.zeros``: one fill launch of its own) and its one persistent kernel, which
reduces the rows itself; and the backward's one scaling kernel (``kd_scale_kernel``). Nothing
else runs on the device.

DRAM bytes counted (e_s, e_t: element sizes of the student and teacher logits; g: the stored
gradient's, e_s, or 4 for fp16 logits, whose gradient is kept in fp32 until scaled):

* forward, tile form: read s and t, write the stored gradient: e_s + e_t + g per element.
* forward, split form: the statistics items read s and t, the gradient items read them again
  and write the gradient. The re-read is counted as L2 traffic (no DRAM bytes) only when the
  plan guarantees it: the working set between a chunk's read and its re-read
  (``kd.split_working_set``: (lag + programs) * chunk * (e_s + e_t + gradient bytes)) is within
  L2_BUDGET, a third of the modelled GPU's L2; else as DRAM: e_s + e_t + g, or 2 (e_s + e_t) + g.
* backward: the scaling kernel reads the stored gradient and writes the logits' gradient:
  g + e_s per element, one launch.
* per row: label (8 B), gathered temperature (4 B) and loss (4 B) once per kernel that reads the
  row (the split kernel's repeated reads of a row's label and temperature by its items hit L2);
  the finishing reduction reads each row's loss and label again (12 B); the split form's 6 fp32
  partials per (row, chunk) and ``kd.ROW_STATISTICS`` fp32 values per row for its gradient items
  are written once and read once from DRAM (their repeated reads by the row's other items hit
  L2), and its memset writes 4 B per row (the row counters; the kernel's atomics on them stay in
  L2). A weighted call (``weight_tensors``) adds 4 B per row per weight tensor, read by the tile
  kernel or the split form's completing statistics item: bytes per row, none per element.

The minimum is one read of each input, one write of the gradient and the backward's read and
write: fp32 20 B/element, bf16 10 B/element.

Time per call, per GPU: the GPU's time is the larger of the DRAM time at ACHIEVABLE_FRACTION
(90%) of the peak and the instruction-issue bound (SASS instructions of each sm_90 cubin: the hot
loop's per iteration, counted once per iteration a program makes, the rest once a program; for
the split kernel, per work item: the item loop's body without the other kind of item's branch,
its column loop once per block of the chunk; 4 warp instructions a clock per SM at the boost
clock), plus LAUNCH_OVERHEAD_S per launch (the memset included). The host's time is the eager
path's per forward + backward call, from ``benchmarks.kd_host_cost`` (measured on this
machine's CPU with Triton's launch recorded, when given). Launches are asynchronous, so a call
costs the larger of the two.
"""

import torch

from benchmarks.gpu_model import hardware
from fastabsld.kernels import kd_kl_div as kd

SHAPES = ((128, 10), (1024, 100), (256, 1000), (8, 32000), (64, 262144), (4096, 32000))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROW_BYTES = 8 + 4 + 4   # label, gathered temperature, loss
REDUCE_ROW_BYTES = 4 + 8  # the finishing reduction reads each row's loss and label
WEIGHT_ROW_BYTES = 4    # one fp32 weight (gathered per class, or per row) per weight tensor
COUNTER_BYTES = 4       # the split kernel's int32 work counter per row (zeroed by a memset)
MEMSET = "memset (counters)"
# L2 the split form's re-read may count on: a third of the modelled GPU's (H100 and H200: 50 MB).
L2_BUDGET = hardware.H100.l2_bytes // 3


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


def split_arguments(launch):
    """The split kernel's launch arguments by name, and its plan: chunk, programs, lag.

    Args:
        launch: a ``kd.Launch`` of ``kd._kd_split_kernel``.

    Returns:
        dict: the arguments by name, with CHUNK and programs added.
    """
    args = dict(zip(launch.kernel.arg_names, launch.args))
    args["CHUNK"] = args["blocks_per_chunk"] * launch.constexprs["BLOCK_N"]
    args["programs"] = launch.grid[0]
    return args


def rereads_from_l2(launch, column_bytes):
    """Whether the split plan keeps the gradient items' re-read in L2: its working set
    (``kd.split_working_set``) within L2_BUDGET.

    Args:
        launch: the split kernel's ``kd.Launch``.
        column_bytes: bytes per column read and written (inputs and stored gradients).

    Returns:
        tuple: (bool, the working set in bytes).
    """
    args = split_arguments(launch)
    working = kd.split_working_set(args["lag"], args["programs"], args["CHUNK"], column_bytes)
    return working <= L2_BUDGET, working


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
        without the per-row bytes), and for the split form rereads_from_l2 and working_set.
    """
    stored = student_bytes if stored_bytes is None else stored_bytes
    reads = student_bytes + teacher_bytes
    minimum_elements = reads + 3 * student_bytes
    element_bytes = reads + 2 * stored + student_bytes
    weight_bytes = weight_tensors * WEIGHT_ROW_BYTES
    extra = {}
    if launches[0].kernel is kd._kd_tile_kernel:
        row_bytes = ROW_BYTES + weight_bytes
    else:
        n_chunks = split_arguments(launches[0])["n_chunks"]
        in_l2, working = rereads_from_l2(launches[0], reads + stored)
        extra = {"rereads_from_l2": in_l2, "working_set": working}
        if not in_l2:
            element_bytes += reads
        row_bytes = ROW_BYTES + 2 * 4 * (kd.N_PARTIALS * n_chunks + kd.ROW_STATISTICS) + COUNTER_BYTES + weight_bytes
    elements = batch * num_classes
    rows = batch * (row_bytes + REDUCE_ROW_BYTES)
    return {"bytes": elements * element_bytes + rows,
            "min_bytes": elements * minimum_elements + batch * (ROW_BYTES + weight_bytes),
            "element_bytes": element_bytes, "min_element_bytes": minimum_elements, "elements": elements, **extra}


def _iterations(launch):
    """Hot-loop iterations one program of ``launch`` makes (1 for a kernel without a loop)."""
    args = dict(zip(launch.kernel.arg_names, launch.args))
    name = _name(launch)
    if name == "_kd_reduce_kernel":
        return -(-args["B"] // launch.constexprs["BLOCK"])
    return 1


def _forward_branches(instructions, start, end):
    """If/else regions inside [start, end]: (branch address, else start, join) for each conditional
    forward branch whose target follows an unconditional forward branch (the then-block's jump to
    the join)."""
    at = dict(instructions)
    found = []
    for address, text in instructions:
        match = hardware.BRANCH.search(text)
        if not (start <= address <= end and match and text.startswith("@")):
            continue
        target = int(match.group(1), 16)
        before_target = target - hardware.INSTRUCTION_BYTES
        jump = hardware.BRANCH.search(at.get(before_target, ""))
        if target > address and jump and not at[before_target].startswith("@"):
            join = int(jump.group(1), 16)
            if target < join <= end + hardware.INSTRUCTION_BYTES:
                found.append((address, target, join))
    return found


def _longest_loop(instructions, start, end):
    """Instructions of the longest loop inside [start, end)."""
    inside = [span for span in hardware.loop_spans(instructions) if start <= span[0] and span[1] < end]
    return max(map(hardware.span_instructions, inside), default=0)


def _leaving(instructions, start, end):
    """Instructions from the earliest conditional branch in [start, end) that jumps to ``end`` or
    beyond, to ``end``: the code such a branch skips (0 without one)."""
    for address, text in instructions:
        match = hardware.BRANCH.search(text)
        if start <= address < end and match and text.startswith("@") and int(match.group(1), 16) >= end:
            return (end - address) // hardware.INSTRUCTION_BYTES - 1
    return 0


def split_item_instructions(instructions, blocks_per_chunk, n_chunks):
    """Instructions of the split kernel per statistics item, per gradient item and per program.

    The item loop is the longest loop; inside it the widest if/else separates the statistics
    branch from the gradient branch. An item runs the loop's body without the other branch, and
    its branch's column loop (its longest loop) once per block of its chunk. In the statistics
    branch, what the first conditional branch out of it skips is the completing item's combine:
    once per row, so 1 / n_chunks of it per item. A gradient item's wait loop and its branches for
    gradients not asked for count in full (an upper bound).

    Args:
        instructions: ``hardware.sass_instructions`` of the kernel.
        blocks_per_chunk: blocks a chunk's column loop runs.
        n_chunks: chunks per row.

    Returns:
        tuple: (per statistics item, per gradient item, per program outside the item loop).
    """
    total = len(instructions)
    start, end = max(hardware.loop_spans(instructions), key=hardware.span_instructions)
    body = hardware.span_instructions((start, end))
    branches = _forward_branches(instructions, start, end)
    if not branches:  # no if/else found: every item counts the whole body (an upper bound)
        return body, body, total - body
    branch, other, join = max(branches, key=lambda b: b[2] - b[0])
    statistics = (other - branch) // hardware.INSTRUCTION_BYTES - 1
    gradients = (join - other) // hardware.INSTRUCTION_BYTES
    extra = blocks_per_chunk - 1
    combine = _leaving(instructions, branch + hardware.INSTRUCTION_BYTES, other)
    return (body - gradients - combine + combine / n_chunks + extra * _longest_loop(instructions, branch, other),
            body - statistics + extra * _longest_loop(instructions, other, join), total - body)


def issue(launch, compiled):
    """Instructions ``launch`` issues (summed over threads) by its sm_90 SASS, statically counted.

    Args:
        launch: a ``kd.Launch``.
        compiled: ``hardware.compile_for_sm90``'s dict for it; for the split kernel its
            ``item_instructions`` are set: per statistics item, per gradient item, and the item
            loop's body (per thread).

    Returns:
        float: thread instructions.
    """
    instructions = hardware.sass_instructions(compiled["cubin"])
    threads = 32 * launch.num_warps
    if launch.kernel is kd._kd_split_kernel:
        args = split_arguments(launch)
        per_statistics, per_gradient, per_program = split_item_instructions(instructions, args["blocks_per_chunk"],
                                                                            args["n_chunks"])
        compiled["item_instructions"] = {"statistics": per_statistics, "gradient": per_gradient,
                                         "loop": len(instructions) - per_program}
        items = args["B"] * args["n_chunks"]
        gradients = items if (launch.constexprs["STUDENT_GRAD"] or launch.constexprs["TEACHER_GRAD"]) else 0
        return (per_statistics * items + per_gradient * gradients + per_program * launch.grid[0]) * threads
    loop, total = hardware.loop_instructions(instructions)
    per_program = (total - loop) + loop * _iterations(launch)
    return per_program * launch.grid[0] * threads


def _name(launch):
    return launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else launch.kernel.__name__


def _describe(launch, compiled):
    name = _name(launch)
    sizes = " ".join(f"{k}={int(v)}" for k, v in launch.constexprs.items()
                     if k in ("BLOCK_M", "BLOCK_N", "VEC", "WIDE", "BLOCK"))
    if launch.kernel is kd._kd_split_kernel:
        args = split_arguments(launch)
        sizes += f" CHUNK={args['CHUNK']} chunks={args['n_chunks']} lag={args['lag']}"
    if launch.constexprs.get("PREFETCH"):
        stages = "prefetch"
    elif launch.num_stages > 1:
        stages = f"{launch.num_stages} cp.async" if "cp.async" in compiled["ptx"] else f"{launch.num_stages} (none)"
    else:
        stages = "1"
    return hardware.launch_row(name.strip("_"), launch.grid[0], launch.num_warps, sizes, stages, compiled)


def _memset_row(counters):
    """The model's line for the memset that zeroes the split kernel's counters (no kernel of ours)."""
    return {"kernel": MEMSET, "programs": 0, "num_warps": 0, "blocks": f"{counters} int32", "num_stages": "-",
            "registers": 0, "spills": 0, "shared": 0, "ctas_per_sm": 0, "limiter": "-", "waves": 0.0,
            "resident": 1.0}


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
        split = launches[0].kernel is kd._kd_split_kernel
        described = [_describe(launch, c) for launch, c in zip(launches, compiled_case)]
        instructions = [issue(launch, c) for launch, c in zip(launches, compiled_case)]
        if split:  # the counters' memset comes first: a launch, no instructions of ours
            described.insert(0, _memset_row(kd.WORK_COUNTERS + batch))
            instructions.insert(0, 0)
        row = {"op": "kd_kl_div fwd+bwd", "case": f"({batch}, {num_classes}) {name}",
               "logit_bytes": batch * num_classes * element, "form": "split" if split else "tile",
               "launches": described, "kernel_launches": len(described),
               "forward_launches": len(described) - 1, "backward_launches": 1}
        row.update(traffic(launches, batch, num_classes, element, element))
        for launch, count in zip(row["launches"], instructions):
            launch["instructions_per_element"] = count / row["elements"]
        if split:
            row["launches"][1]["item_instructions"] = compiled_case[0]["item_instructions"]
        row["instructions_per_element"] = sum(instructions) / row["elements"]
        host = None if host_us is None or name != "fp32" else host_us.get((batch, num_classes))
        row["host_us"] = host
        row["times"] = {}
        for gpu in (hardware.H100, hardware.H200):
            memory = hardware.achievable_seconds(row["bytes"], gpu)
            issued = sum(hardware.issue_seconds(count / 32, gpu) for count in instructions)  # thread -> warp
            gpu_us = 1e6 * (max(memory, issued) + row["kernel_launches"] * hardware.LAUNCH_OVERHEAD_S)
            row["times"][gpu.name] = gpu_us if host is None else max(gpu_us, host)
            row.setdefault("bound", {})[gpu.name] = ("host" if host is not None and host > gpu_us else
                                                     "issue" if issued > memory else "DRAM")
        notes = (f"launches: {row['forward_launches']} forward + 1 backward (all of the eager path); "
                 f"{row['instructions_per_element']:.0f} SASS instructions/element; bound: "
                 + ", ".join(f"{gpu} {bound}" for gpu, bound in row["bound"].items()))
        if host is not None:
            notes += f"; host {host:.0f} us a call"
        if split:
            where = "L2" if row["rereads_from_l2"] else "DRAM"
            notes += (f"; split: {row['working_set'] / hardware.MIB:.1f} MiB pass through L2 between a chunk's read "
                      f"and its re-read (budget {L2_BUDGET / hardware.MIB:.1f} MiB): the re-read is counted as {where}")
        row["notes"] = notes
        out.append(row)
    return out
