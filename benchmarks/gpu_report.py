"""GPU report: each fastabsld op against eager and torch.compile, as time and achieved GB/s against the
device's peak, and the CIFAR-10 training step (ResNet-18 student, WRN-34-10 teacher) against the released loop.

Runs only on a CUDA machine (it exits with a message otherwise):

    python -m benchmarks.gpu_report [--iters 50] [--skip-train] [--train-batch 128] [--json report.json]

Bandwidth is reported two ways per row:

- ``GB/s`` and ``peak``: the op's compulsory bytes over the time, the same bytes for every
  implementation of a case (so the column compares them): for the KD loss one read of the student
  and teacher logits, one write of the student gradient and the backward's read and write of it,
  plus the per-row label, temperature, loss and grad_output (``benchmarks.gpu_model.kd_kl_div``);
  for the PGD step one read of x_adv, x and grad and one write, for both norms.
- ``kernel GB/s`` (fastabsld rows): the bytes fastabsld's own launches move according to
  ``benchmarks.gpu_model`` (the split KD form reads its inputs twice; the PGD step moves the
  minimum plus its per-sample partial sums) over the time: how close the kernels come to the DRAM peak.

The shapes and dtypes are those of ``benchmarks.gpu_model``: the KD benchmark's (B, C) plus
(64, 262144) and (4096, 32000) in fp32 and bf16; PGD (128|512, 3, 32, 32) and (512, 3, 224, 224).

The non-GPU parts (argument parsing, byte counts, peak lookup) import and run on any machine.
"""

import argparse
import json
import sys
import time

import torch

from benchmarks.gpu_model import kd_kl_div as kd_model
from benchmarks.gpu_model import pgd_step as pgd_model

KD_SHAPES = kd_model.SHAPES
KD_DTYPES = kd_model.DTYPES
PGD_SHAPES = pgd_model.SHAPES
PGD_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# Peak DRAM bandwidth in GB/s by device-name fragment, for when the properties do not give it.
PEAK_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0,
            "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "L4": 300.0,
            "A10": 600.0, "V100": 900.0, "T4": 320.0}


def kd_bytes(rows, cols, dtype=torch.float32):
    """DRAM bytes of the fused KD loss, forward and backward, per ``benchmarks.gpu_model``.

    Args:
        rows, cols: the logits' shape (B, C).
        dtype: the student's and teacher's dtype.

    Returns:
        tuple[int, int]: (compulsory bytes, bytes fastabsld's launches move for this shape).
    """
    element = torch.empty((), dtype=dtype).element_size()
    traffic = kd_model.traffic(kd_model.plan_case(rows, cols, dtype), rows, cols, element, element)
    return traffic["min_bytes"], traffic["bytes"]


def pgd_bytes(shape, norm="linf", dtype="float32"):
    """DRAM bytes of one PGD step, per ``benchmarks.gpu_model``.

    Args:
        shape: the input batch's shape.
        norm: ``"linf"`` or ``"l2"``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"float64"``.

    Returns:
        tuple[int, int]: (compulsory bytes: read x_adv, x, grad and write the output; bytes
        fastabsld's launches move).
    """
    launches = pgd_model.launch_plan(shape, dtype, norm)
    numel = 1
    for size in shape:
        numel *= size
    return 4 * numel * pgd_model.ELEMENT_BYTES[dtype], sum(launch["dram_bytes"] for launch in launches)


def gbs(nbytes, seconds):
    """Achieved bandwidth in GB/s (1e9 bytes per second).

    Args:
        nbytes: bytes moved.
        seconds: time taken.

    Returns:
        float: GB/s.
    """
    return nbytes / seconds / 1e9


def peak_gbs(name, memory_clock_khz=None, bus_width_bits=None):
    """The device's peak DRAM bandwidth in GB/s: from clock and bus width when known, else by name.

    Args:
        name: device name (``torch.cuda.get_device_name``).
        memory_clock_khz: memory clock in kHz (device properties), or None.
        bus_width_bits: memory bus width in bits, or None.

    Returns:
        float or None: GB/s (None when unknown).
    """
    if memory_clock_khz and bus_width_bits:
        return 2 * memory_clock_khz * 1e3 * bus_width_bits / 8 / 1e9  # double data rate
    for fragment, value in PEAK_GBS.items():
        if fragment.lower() in name.lower():
            return value
    return None


def parse_args(argv=None):
    """The command line of the report.

    Args:
        argv: arguments (None: ``sys.argv[1:]``).

    Returns:
        argparse.Namespace.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=50, help="timed iterations per case (default: 50)")
    p.add_argument("--skip-ops", action="store_true", help="skip the per-op timings")
    p.add_argument("--skip-train", action="store_true", help="skip the training-step timings")
    p.add_argument("--skip-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--train-batch", type=int, default=128, help="batch of the training step (default: 128)")
    p.add_argument("--models", nargs=2, default=("resnet18", "wrn-34-10"), metavar=("STUDENT", "TEACHER"))
    p.add_argument("--peak-gbs", type=float, default=None, help="override the device's peak bandwidth")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--smoke", action="store_true",
                   help="check the script on the CPU: smallest shapes, tiny models, 1 iteration (times mean nothing)")
    args = p.parse_args(argv)
    if args.iters < 1 or args.train_batch < 1:
        p.error("--iters and --train-batch must be >= 1")
    return args


def cuda_time(fn, iters, warmup=3):
    """Mean time of ``fn()`` in seconds over ``iters`` calls (after ``warmup`` calls), measured with CUDA events
    (with ``time.perf_counter`` in a ``--smoke`` run on the CPU)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        began = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - began) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def _eager_kd(student, teacher, labels, tau):
    # The ABSLD call: the teacher's temperature gathered by label, batchmean KL.
    log_q = torch.log_softmax(student.float(), dim=1)
    log_p = torch.log_softmax(teacher.float() / tau[labels].unsqueeze(1), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum() / student.shape[0]


def _eager_linf(x_adv, x, grad, alpha, eps):
    delta = torch.clamp(x_adv + alpha * grad.sign() - x, -eps, eps)
    return torch.clamp(x + delta, 0, 1)


def _eager_l2(x_adv, x, grad, alpha, eps):
    b = x_adv.shape[0]
    g = grad / (grad.reshape(b, -1).norm(dim=1) + 1e-10).reshape(-1, 1, 1, 1)
    delta = x_adv + alpha * g - x
    factor = torch.clamp(eps / delta.reshape(b, -1).norm(dim=1), max=1.0).reshape(-1, 1, 1, 1)
    return torch.clamp(x + delta * factor, 0, 1)


def op_rows(args, peak):
    """Times the KD loss (fwd+bwd) and the PGD steps: fastabsld, eager, torch.compile."""
    from fastabsld.loss import kd_kl_div
    from fastabsld.ops import pgd_step

    rows = []
    device = args.device
    compiled_kd = None if args.skip_compile else torch.compile(_eager_kd)
    kd_cases = [((b, c), name) for b, c in KD_SHAPES for name in KD_DTYPES]
    for (b, c), dtype_name in kd_cases[:1] if args.smoke else kd_cases:
        dtype = KD_DTYPES[dtype_name]
        s = torch.randn(b, c, device=device, dtype=dtype, requires_grad=True)
        t = torch.randn(b, c, device=device, dtype=dtype)
        y = torch.randint(0, c, (b,), device=device)
        tau = torch.rand(c, device=device) + 0.5
        impls = {"fastabsld": lambda: kd_kl_div(s, t, labels=y, teacher_temperature=tau, reduction="batchmean"),
                 "eager": lambda: _eager_kd(s, t, y, tau)}
        if compiled_kd is not None and dtype_name == "fp32":  # one compile per shape is what the time allows
            impls["compile"] = lambda: compiled_kd(s, t, y, tau)
        nbytes, kernel_bytes = kd_bytes(b, c, dtype)
        for impl, fn in impls.items():
            seconds = cuda_time(lambda: torch.autograd.grad(fn(), s), args.iters)
            rows.append(_row(f"kd fwd+bwd {dtype_name} ({b}, {c})", impl, seconds, nbytes, peak,
                             kernel_bytes if impl == "fastabsld" else None))
    steps = {"linf": (_eager_linf, 2 / 255, 8 / 255), "l2": (_eager_l2, 0.1, 0.5)}
    pgd_cases = [(shape, name) for shape in PGD_SHAPES for name in PGD_DTYPES]
    for shape, dtype_name in pgd_cases[:1] if args.smoke else pgd_cases:
        dtype = getattr(torch, PGD_DTYPES[dtype_name])
        x = torch.rand(shape, device=device, dtype=dtype)
        x_adv = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
        grad = torch.randn_like(x)
        for norm, (eager, alpha, eps) in steps.items():
            impls = {"fastabsld": lambda: pgd_step(x_adv, x, grad, alpha=alpha, eps=eps, norm=norm),
                     "eager": lambda: eager(x_adv, x, grad, alpha, eps)}
            if not args.skip_compile and dtype_name == "fp32":
                compiled = torch.compile(eager, dynamic=False)
                impls["compile"] = lambda: compiled(x_adv, x, grad, alpha, eps)
            nbytes, kernel_bytes = pgd_bytes(shape, norm, PGD_DTYPES[dtype_name])
            for impl, fn in impls.items():
                rows.append(_row(f"pgd {norm} {dtype_name} {tuple(shape)}", impl, cuda_time(fn, args.iters),
                                 nbytes, peak, kernel_bytes if impl == "fastabsld" else None))
    return rows


def _row(case, impl, seconds, nbytes, peak, kernel_bytes=None):
    achieved = gbs(nbytes, seconds) if nbytes else None
    kernel = gbs(kernel_bytes, seconds) if kernel_bytes else None
    return {"case": case, "impl": impl, "us": seconds * 1e6, "GB/s": achieved,
            "peak%": None if achieved is None or not peak else 100 * achieved / peak,
            "kernel GB/s": kernel, "kernel peak%": None if kernel is None or not peak else 100 * kernel / peak}


def train_rows(args):
    """Times one CIFAR-10 training step (synthetic data): the released loop and fastabsld's options."""
    from fastabsld.recipe import speed
    from fastabsld.recipe.config import TrainConfig
    from fastabsld.recipe.loop import train_epoch
    from fastabsld.recipe.models import build_model
    from fastabsld.recipe.steps import build_loss
    from tests.released import released_step

    student_name, teacher_name = args.models
    device = args.device
    x = torch.rand(args.train_batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.train_batch,), device=device)
    variants = {"released": None, "fastabsld": {}, "fastabsld amp+channels-last": {"amp": True, "channels_last": True}}
    if not args.skip_compile:
        variants["fastabsld amp+channels-last+compile"] = {"amp": True, "channels_last": True, "compile": True}
    teacher = build_model(teacher_name, 10, 3).to(device).eval().requires_grad_(False)
    rows = []
    for name, options in variants.items():
        torch.manual_seed(0)
        student = build_model(student_name, 10, 3).to(device)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        gen = torch.Generator(device=device).manual_seed(1)
        if options is None:
            state = {k: torch.ones(10, device=device) for k in ("tau_adv", "tau_nat")}
            state.update({k: torch.zeros(10, device=device) for k in ("risk_adv", "risk_nat")})

            def run():
                released_step(student, teacher, optimizer, x, y, state, eps=8 / 255, alpha=2 / 255, generator=gen)
        else:
            cfg = TrainConfig(dataset="cifar10", progress=False, device=device, **options)
            model_t = teacher.to(memory_format=torch.channels_last) if cfg.channels_last else teacher
            if cfg.channels_last:
                student = student.to(memory_format=torch.channels_last)
            step_student, view, model_t = speed.step_models(student, cfg, teacher=model_t)
            loss_fn = build_loss(cfg, 10).to(device)

            def run():
                train_epoch(step_student, loss_fn, optimizer, [(x, y)], cfg, gen, teacher=model_t, device=device,
                            attack_model=view)
        seconds = cuda_time(run, max(3, args.iters // 10), warmup=1 if args.smoke else 3)
        rows.append({"case": f"train step {student_name}/{teacher_name} B={args.train_batch}", "impl": name,
                     "us": seconds * 1e6, "GB/s": None, "peak%": None})
    base = rows[0]["us"]
    for row in rows:
        row["speed-up"] = base / row["us"]
    return rows


def format_rows(rows):
    """A text table of the report's rows.

    Args:
        rows: list of dicts with ``case``, ``impl``, ``us``, ``GB/s``, ``peak%`` (and optionally
            ``kernel GB/s``, ``kernel peak%``, ``speed-up``).

    Returns:
        str: the table.
    """
    def number(value, width, suffix=""):
        return f"{value:>{width - len(suffix)}.1f}{suffix}" if value is not None else f"{'-':>{width}}"

    lines = [f"{'case':<40}{'impl':<36}{'time':>12}{'GB/s':>9}{'peak':>8}{'kern GB/s':>10}{'kern':>8}{'x':>7}"]
    for r in rows:
        up = f"{r['speed-up']:>7.2f}" if r.get("speed-up") is not None else f"{'':>7}"
        lines.append(f"{r['case']:<40}{r['impl']:<36}{r['us']:>10.1f}us{number(r.get('GB/s'), 9)}"
                     f"{number(r.get('peak%'), 8, '%')}{number(r.get('kernel GB/s'), 10)}"
                     f"{number(r.get('kernel peak%'), 8, '%')}{up}")
    return "\n".join(lines)


def main(argv=None):
    """Runs the report; exits with status 2 and a message when there is no CUDA device."""
    args = parse_args(argv)
    if args.smoke:
        args.iters, args.skip_compile, args.train_batch, args.models, args.device = 1, True, 4, ("cnn-s", "cnn-l"), "cpu"
        print("smoke run on the CPU: the figures below check the script, they measure nothing")
        print(format_rows((op_rows(args, None) if not args.skip_ops else []) + ([] if args.skip_train else train_rows(args))))
        return None
    args.device = "cuda"
    if not torch.cuda.is_available():
        print("gpu_report: no CUDA device here; run it on a machine with an NVIDIA GPU "
              "(the CPU benchmarks are `pytest benchmarks --benchmark-only`).", file=sys.stderr)
        raise SystemExit(2)
    props = torch.cuda.get_device_properties(0)
    peak = args.peak_gbs or peak_gbs(props.name, getattr(props, "memory_clock_rate", None),
                                     getattr(props, "memory_bus_width", None))
    print(f"device: {props.name}, peak DRAM bandwidth {peak or 'unknown'} GB/s, torch {torch.__version__}")
    rows = [] if args.skip_ops else op_rows(args, peak)
    if not args.skip_train:
        rows += train_rows(args)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "peak_gbs": peak, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
