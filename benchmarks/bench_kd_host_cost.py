"""Host time of one eager KD loss call on its CUDA path, Triton's launches recorded, not made.

See ``benchmarks/kd_host_cost.py`` for what is measured and how (CPU tensors down the CUDA path,
a Triton driver that compiles for sm_90 and records the driver's launch call). Each case records
the Triton launches of a forward and a backward in ``extra_info``; ``python -m
benchmarks.kd_host_cost`` prints the same as a table.

    python -m pytest benchmarks/bench_kd_host_cost.py --benchmark-only --benchmark-timer=time.process_time

(``time.process_time``: on a shared machine, the time a call waits for a core is not its cost.)
"""

import pytest
import torch

from benchmarks import kd_host_cost

pytestmark = pytest.mark.skipif(kd_host_cost.interpreted(),
                                reason="needs Triton's compiler, not the interpreter (run benchmarks/ alone)")


@pytest.mark.parametrize("shape", kd_host_cost.SHAPES, ids=str)
def test_forward_host_cost(benchmark, shape):
    benchmark.group = "kd_kl_div eager CUDA path, host time (launch recorded)"
    student, teacher, labels, tau = kd_host_cost.case(*shape)
    with kd_host_cost.recorded_cuda_path() as recorder:
        forward, backward = kd_host_cost.launches(recorder, *shape)
        benchmark(kd_host_cost.forward, student, teacher, labels, tau)
    benchmark.extra_info["forward_launches"] = [name for name, _ in forward]
    benchmark.extra_info["backward_launches"] = [name for name, _ in backward]
    assert len(backward) == 1
    assert len(forward) <= (2 if forward[0][0] == "_kd_tile_kernel" else 3)


@pytest.mark.parametrize("shape", kd_host_cost.SHAPES[:1], ids=str)
def test_backward_host_cost(benchmark, shape):
    benchmark.group = "kd_kl_div eager CUDA path, host time (launch recorded)"
    student, teacher, labels, tau = kd_host_cost.case(*shape)
    with kd_host_cost.recorded_cuda_path():
        benchmark.pedantic(torch.autograd.grad, setup=lambda: ((kd_host_cost.forward(student, teacher, labels, tau),
                                                                student), {}), rounds=200)
