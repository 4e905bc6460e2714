"""The eager CUDA path's direct launches, checked with Triton compiling for sm_90 (no interpreter).

In a fresh process without TRITON_INTERPRET, ``benchmarks.kd_host_cost`` runs the loss under a
driver that records launches. The first call of a plan launches through Triton's own path
(``kernel[grid]``: binding, specialisation, compile); later calls launch the compiled kernel
directly. Both must hand the driver the same arguments, and the launches per call are those the
design allows: tile form two forward (row kernel, reduction) and one backward; split form two
forward, of which the recorder sees one: the zeroing of the split kernel's work counters
(``torch.zeros``) is a memset, not a Triton launch, and the persistent kernel reduces the rows itself.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import torch
    from benchmarks import kd_host_cost
    from fastabsld.kernels import kd_kl_div as kd

    def same(first, second):
        assert len(first) == len(second)
        for a, b in zip(first, second):
            if torch.is_tensor(a):
                assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, (a, b)
            else:
                assert a == b and type(a) is type(b), (a, b)

    with kd_host_cost.recorded_cuda_path() as recorder:
        for shape in ((64, 10), (4, 20000)):
            student, teacher, labels, tau = kd_host_cost.case(*shape)
            kd._PLANS.clear()
            recorder.clear()
            torch.autograd.grad(kd_host_cost.forward(student, teacher, labels, tau), student)
            assert all(step.compiled is not None for plan in kd._PLANS.values() for step in plan.static.steps)
            first = list(recorder.arguments)
            names = [name for name, _ in recorder.launches]
            recorder.clear()
            torch.autograd.grad(kd_host_cost.forward(student, teacher, labels, tau), student)
            assert [name for name, _ in recorder.launches] == names
            for a, b in zip(first, recorder.arguments):
                same(a, b)
            print(shape, names)
""")


def test_direct_launches_pass_what_triton_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "(64, 10) ['_kd_tile_kernel', '_kd_reduce_kernel', '_kd_scale_kernel']"
    # forward: the split kernel (after the counters' memset, which the recorder does not see); backward: the scaling
    assert lines[1] == "(4, 20000) ['_kd_split_kernel', '_kd_scale_kernel']"
