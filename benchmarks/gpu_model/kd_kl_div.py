"""Model of the fused KD loss (``fastabsld.kernels.kd_kl_div``) at the benchmark's shapes.

The case is the ABSLD use of ``benchmarks/bench_kd_kl_div.py``: per-class teacher temperatures
gathered by label, the student's gradient only, forward and backward. The launches are the ones
``kd_kl_div.plan`` makes for (B, C) logits on a 132-SM GPU (meta tensors: nothing runs).

DRAM bytes counted (e_s, e_t: element sizes of the student and teacher logits):

* forward, tile form: read s and t, write the student gradient: e_s + e_t + e_s per element.
* forward, split form: the statistics pass reads s and t, the finish pass reads them again and
  writes the gradient: 2 (e_s + e_t) + e_s per element. The second read is counted as DRAM: L2
  holds it only while both inputs fit in it, which the notes give per case.
* backward (in the op layer): ``grad * grad_output`` reads the stored gradient and writes the
  logits' gradient, 2 e_s per element, one launch. Skipping it would need to know on the host
  that grad_output is 1 (a device sync) or to scale lazily, which autograd cannot; so it stays.
* per row: label (8 B), gathered temperature (4 B) and loss (4 B) per kernel that touches the
  row, grad_output (4 B) in the backward; the split form's 6 fp32 partials per (row, chunk) are
  written once and read once from DRAM (their repeated reads by the row's other chunks hit L2).
  A weighted call (``weight_tensors``: a per-class ``weight``, a ``sample_weight`` or both) adds
  4 B per row per weight tensor, in the tile kernel or in each (row, chunk) program of the split
  form's finish kernel (the statistics pass reads none): bytes per row, none per element.

The minimum is one read of each input, one write of the gradient and the backward's read and
write, with the tile form's per-row bytes: fp32 20 B/element, bf16 10 B/element.
"""

import torch

from benchmarks.gpu_model import hardware
from fastabsld.kernels import kd_kl_div as kd

SHAPES = ((128, 10), (1024, 100), (256, 1000), (8, 32000), (64, 262144), (4096, 32000))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROW_BYTES = 8 + 4 + 4   # label, gathered temperature, loss
BACKWARD_ROW_BYTES = 4  # grad_output
WEIGHT_ROW_BYTES = 4    # one fp32 weight (gathered per class, or per row) per weight tensor


def plan_case(batch, num_classes, dtype):
    """The launches ``kd.plan`` makes for the benchmark's call at (B, C) in ``dtype``.

    Args:
        batch: B.
        num_classes: C.
        dtype: the logits' dtype (student and teacher).

    Returns:
        list: ``kd.Launch`` objects.
    """
    logits = torch.empty(batch, num_classes, dtype=dtype, device="meta")
    labels = torch.empty(batch, dtype=torch.int64, device="meta")
    tau = torch.empty(num_classes, dtype=torch.float32, device="meta")
    _, launches = kd.plan(logits, logits.clone(), labels, tau, None, 1.0, 1.0, -100, True, False)
    return launches


def traffic(launches, batch, num_classes, student_bytes, teacher_bytes, weight_tensors=0):
    """DRAM bytes of the forward launches and the backward, and their minimum.

    Args:
        launches: the forward's launches.
        batch: B.
        num_classes: C.
        student_bytes: e_s.
        teacher_bytes: e_t.
        weight_tensors: weight tensors the call passes (0, 1 or 2; a number weight moves nothing).

    Returns:
        dict: bytes, min_bytes (totals), element_bytes and min_element_bytes (per element,
        without the per-row bytes).
    """
    reads = student_bytes + teacher_bytes
    minimum_elements = reads + student_bytes + 2 * student_bytes
    weight_bytes = weight_tensors * WEIGHT_ROW_BYTES
    if launches[0].kernel is kd._kd_tile_kernel:
        element_bytes = minimum_elements
        row_bytes = ROW_BYTES + weight_bytes
    else:
        n_chunks = launches[0].args[launches[0].kernel.arg_names.index("n_chunks")]
        element_bytes = minimum_elements + reads
        row_bytes = 2 * ROW_BYTES + 2 * kd.N_PARTIALS * 4 * n_chunks + weight_bytes * n_chunks
    elements = batch * num_classes
    rows = batch * (row_bytes + BACKWARD_ROW_BYTES)
    return {"bytes": elements * element_bytes + rows,
            "min_bytes": elements * minimum_elements + batch * (ROW_BYTES + weight_bytes + BACKWARD_ROW_BYTES),
            "element_bytes": element_bytes, "min_element_bytes": minimum_elements, "elements": elements}


def _describe(launch, compiled):
    name = launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else launch.kernel.__name__
    sizes = " ".join(f"{k}={int(v)}" for k, v in launch.constexprs.items()
                     if k in ("BLOCK_M", "BLOCK_N", "VEC", "WIDE"))
    if name != "_kd_tile_kernel":
        args = dict(zip(launch.kernel.arg_names, launch.args))
        sizes += f" CHUNK={args['blocks_per_chunk'] * launch.constexprs['BLOCK_N']} chunks={args['n_chunks']}"
    if launch.constexprs.get("PREFETCH"):
        stages = "prefetch"
    elif launch.num_stages > 1:
        stages = f"{launch.num_stages} cp.async" if "cp.async" in compiled["ptx"] else f"{launch.num_stages} (none)"
    else:
        stages = "1"
    return hardware.launch_row(name.strip("_"), launch.grid[0], launch.num_warps, sizes, stages, compiled)


def rows(shapes=SHAPES, dtypes=tuple(DTYPES)):
    """One case dict per (shape, dtype) (see ``benchmarks.gpu_model`` for the keys).

    Args:
        shapes: (B, C) pairs.
        dtypes: names in DTYPES.

    Returns:
        list: the case dicts.
    """
    cases = [(shape, name, plan_case(*shape, DTYPES[name])) for shape in shapes for name in dtypes]
    compiled = iter(hardware.compile_for_sm90([launch for _, _, launches in cases for launch in launches]))
    out = []
    for (batch, num_classes), name, launches in cases:
        element = DTYPES[name].itemsize
        row = {"op": "kd_kl_div fwd+bwd", "case": f"({batch}, {num_classes}) {name}",
               "logit_bytes": batch * num_classes * element,
               "form": "tile" if launches[0].kernel is kd._kd_tile_kernel else "split",
               "launches": [_describe(launch, next(compiled)) for launch in launches],
               "kernel_launches": len(launches) + 1}
        row.update(traffic(launches, batch, num_classes, element, element))
        inputs = 2 * batch * num_classes * element
        notes = "backward: one grad * grad_output pass (1 launch), kept: skipping it needs a host sync"
        if row["form"] == "split":
            fits = "fit in" if inputs <= hardware.H100.l2_bytes else "exceed"
            notes += (f"; split: the inputs ({inputs / hardware.MIB:.1f} MiB) {fits} the 50 MB L2, "
                      "the re-read is counted as DRAM")
        row["notes"] = notes
        out.append(row)
    return out
