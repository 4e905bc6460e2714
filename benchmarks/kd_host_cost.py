"""Host cost of one eager call of the KD loss on its CUDA path, and the launches it makes.

At ABSLD's shapes the kernels need microseconds of GPU time, so the host time of a call (the
public checks, the plan, allocating the outputs, the launches' arguments) decides the speed.
This measures it without a GPU: CPU tensors go down the CUDA path (``kd_loss_triton``, with
"cpu" added to its ``EAGER_DEVICES``), and Triton runs under ``RecordingDriver``, which compiles
the kernels for sm_90 as a GPU would and replaces the driver's launch call itself
(``cuLaunchKernelEx``) by a recorder. **The launch is recorded, not made**: the figures are the
host time up to the driver, not a GPU's. Allocations are CPU allocations (on a GPU, the caching
allocator's, of similar cost).

The case is the ABSLD one: per-class teacher temperatures gathered by label, "mean" reduction,
the student's gradient. Per shape it reports the forward call's time (``kd_kl_div(...)``), the
backward's (``torch.autograd.grad``, autograd's engine included) and the Triton launches of each.

    python -m benchmarks.kd_host_cost              # a table
    python -m pytest benchmarks/bench_kd_host_cost.py --benchmark-only

Needs Triton's compiler (not the interpreter: run it in a process without TRITON_INTERPRET=1).
"""

import argparse
import contextlib
import os
import statistics
import time

import torch

from fastabsld.loss import kd_kl_div

SHAPES = ((128, 10), (128, 100), (8, 32000))
# The target per forward call, microseconds.
TARGET_US = 25.0
_RECORDER = None


def interpreted():
    """True when Triton runs its interpreter here (then nothing compiles and this cannot measure)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def recorded_cuda_path():
    """CPU tensors take the CUDA path while entered, with Triton's launches recorded instead of made.

    Yields:
        RecordingDriver: its ``launches`` list what was launched.
    """
    from benchmarks.triton_recorder import RecordingDriver
    from fastabsld.ops import kd_loss_triton

    global _RECORDER
    # One driver for the process: compiled kernels keep the launcher of the driver they were loaded by.
    _RECORDER = _RECORDER or RecordingDriver()
    added = "cpu" not in kd_loss_triton.EAGER_DEVICES
    kd_loss_triton.EAGER_DEVICES.add("cpu")
    try:
        with _RECORDER as recorder:
            recorder.clear()
            yield recorder
    finally:
        if added:
            kd_loss_triton.EAGER_DEVICES.discard("cpu")


def case(batch, num_classes, dtype=torch.float32, seed=0):
    """The ABSLD call's inputs at (B, C).

    Returns:
        tuple: (student logits requiring grad, teacher logits, labels, per-class temperatures).
    """
    gen = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(batch, num_classes, generator=gen)).to(dtype).requires_grad_(True)
    teacher = (2 * torch.randn(batch, num_classes, generator=gen)).to(dtype)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    tau = 0.5 + torch.rand(num_classes, generator=gen)
    return student, teacher, labels, tau


def forward(student, teacher, labels, tau):
    """One eager call of the public loss (the ABSLD use)."""
    return kd_kl_div(student, teacher, labels=labels, teacher_temperature=tau, reduction="mean")


def launches(recorder, batch, num_classes):
    """The Triton launches of one forward and one backward at (B, C), after a warm-up call.

    Returns:
        tuple: (forward launches, backward launches), each a list of (kernel name, grid).
    """
    student, teacher, labels, tau = case(batch, num_classes)
    torch.autograd.grad(forward(student, teacher, labels, tau), student)
    recorder.clear()
    loss = forward(student, teacher, labels, tau)
    forward_launches = list(recorder.launches)
    recorder.clear()
    torch.autograd.grad(loss, student)
    return forward_launches, list(recorder.launches)


def _per_call_us(fn, calls, repeats):
    """The fastest of ``repeats`` means over ``calls`` calls, in microseconds of this process's CPU
    time (``time.process_time``: on a shared machine, time spent waiting for a core is not the
    call's), and the median of the runs."""
    best = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best.append((time.process_time() - start) / calls * 1e6)
    return min(best), statistics.median(best)


def measure(batch, num_classes, calls=500, repeats=7):
    """Host CPU time of the forward call and of the backward at (B, C), launches recorded.

    Returns:
        dict: forward_us and backward_us (fastest run's mean), their medians over runs, and the
        forward and backward launches.
    """
    student, teacher, labels, tau = case(batch, num_classes)
    with recorded_cuda_path() as recorder:
        forward_launches, backward_launches = launches(recorder, batch, num_classes)
        forward_us, forward_median = _per_call_us(lambda: forward(student, teacher, labels, tau), calls, repeats)
        losses = [forward(student, teacher, labels, tau) for _ in range(calls * repeats)]
        it = iter(losses)
        backward_us, backward_median = _per_call_us(
            lambda: torch.autograd.grad(next(it), student), calls, repeats)
    return {"forward_us": forward_us, "forward_median_us": forward_median, "backward_us": backward_us,
            "backward_median_us": backward_median, "forward_launches": forward_launches,
            "backward_launches": backward_launches}


def main(argv=None):
    """Prints the host cost and launches per shape.

    Args:
        argv: command line arguments (default: sys.argv[1:]).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs; the fastest is reported")
    args = parser.parse_args(argv)
    if interpreted():
        parser.error("TRITON_INTERPRET=1 is set: this needs Triton's compiler (run it without the interpreter)")
    print("KD loss, eager CUDA path, host CPU time per call on this machine: Triton's driver launch is "
          "RECORDED, not made (no GPU); CPU tensors stand in for CUDA ones.")
    print(f"{'shape':>12} {'forward us':>11} {'(median)':>9} {'backward us':>12} {'(median)':>9}  "
          "Triton launches fwd / bwd")
    for batch, num_classes in SHAPES:
        result = measure(batch, num_classes, args.calls, args.repeats)
        names = " + ".join(name.strip("_") for name, _ in result["forward_launches"])
        back = " + ".join(name.strip("_") for name, _ in result["backward_launches"])
        print(f"{str((batch, num_classes)):>12} {result['forward_us']:11.1f} {result['forward_median_us']:9.1f} "
              f"{result['backward_us']:12.1f} {result['backward_median_us']:9.1f}  "
              f"{len(result['forward_launches'])} ({names}) / {len(result['backward_launches'])} ({back})")
    print("The split form (kd_split_kernel) also zeroes its int32 workspace before its kernel: one fill, an "
          "ATen launch on a GPU (2 launches forward).")
    print(f"target: <= {TARGET_US:.0f} us per forward call")


if __name__ == "__main__":
    main()
