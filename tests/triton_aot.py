"""Compiles Triton kernels ahead of time for real GPUs, without a GPU.

Kernels that run in the interpreter may still fail to compile for a GPU (interpreter-only
code); every kernel test also compiles its kernel for sm_80 and sm_90 here.

Under TRITON_INTERPRET=1 the compile runs in a fresh Python process without it: there every
``@triton.jit`` function (a kernel's helpers, and triton.language's own such as ``tl.max``) is
a real JITFunction, and the interpreter's patches of triton.language cannot leak in (calling
an interpreted ``tl.max`` leaves triton.language.core patched for the rest of the process).
"""

import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGETS = (80, 90)
ROOT = Path(__file__).resolve().parent.parent


def compile_for_gpus(kernel, signature, constexprs, targets=TARGETS, options=None, divisible_by_16=()):
    """Compiles a ``@triton.jit`` kernel to cubin for each compute capability in ``targets``.

    Args:
        kernel: the decorated kernel (a JITFunction, or the interpreter's wrapper of one).
        signature: ``{argument: type}`` for every argument, e.g. ``"*fp32"``, ``"i32"``,
            ``"fp32"``, and ``"constexpr"`` for compile-time constants.
        constexprs: ``{argument: value}`` for the compile-time constants.
        targets: compute capabilities, e.g. (80, 90).
        options: compile options as a launch passes them, e.g. ``{"num_warps": 8, "debug": True}``.
        divisible_by_16: names of pointer or integer arguments to specialise as multiples of 16,
            as a launch does for aligned tensors and such integers (it enables vector accesses).

    Returns:
        dict: ``{capability: compiled kernel}``; each has ``asm["ptx"]`` and ``asm["cubin"]``.
    """
    job = {"kernel": kernel, "signature": signature, "constexprs": constexprs, "options": options,
           "divisible_by_16": divisible_by_16}
    return compile_many_for_gpus([job], targets)[0]


def compile_many_for_gpus(jobs, targets=TARGETS):
    """``compile_for_gpus`` for several kernels or variants at once (one process under the interpreter).

    Args:
        jobs: dicts with the keys ``kernel``, ``signature``, ``constexprs`` and optionally
            ``options`` and ``divisible_by_16``, as the arguments of ``compile_for_gpus``.
        targets: compute capabilities.

    Returns:
        list: for each job, ``{capability: compiled kernel}`` (with ``asm["ptx"]``, ``asm["cubin"]``).
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _compile_in_fresh_process(jobs, targets)
    return [_compile(job, targets) for job in jobs]


def _compile(job, targets):
    kernel = job["kernel"]
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in job.get("divisible_by_16", ())}
    compiled = {}
    for capability in targets:
        source = ASTSource(fn, signature=dict(job["signature"]), constexprs=dict(job["constexprs"]), attrs=attrs)
        compiled[capability] = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                              options=dict(job.get("options") or {}))
        assert compiled[capability].asm["cubin"], f"no cubin for sm_{capability}"
    return compiled


def _compile_in_fresh_process(jobs, targets):
    portable = [dict(job, kernel=(job["kernel"].fn.__module__, job["kernel"].fn.__name__)) for job in jobs]
    with tempfile.TemporaryDirectory() as folder:
        request, reply = Path(folder, "jobs.pkl"), Path(folder, "compiled.pkl")
        request.write_bytes(pickle.dumps((portable, tuple(targets))))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-m", "tests.triton_aot", str(request), str(reply)], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ahead-of-time compile failed:\n{done.stderr[-6000:]}")
        results = pickle.loads(reply.read_bytes())
    return [{capability: types.SimpleNamespace(asm=asm) for capability, asm in result.items()} for result in results]


def _main(request, reply):
    jobs, targets = pickle.loads(Path(request).read_bytes())
    results = []
    for job in jobs:
        module, name = job["kernel"]
        compiled = _compile(dict(job, kernel=getattr(importlib.import_module(module), name)), targets)
        results.append({capability: {"ptx": kernel.asm["ptx"], "cubin": kernel.asm["cubin"]}
                        for capability, kernel in compiled.items()})
    Path(reply).write_bytes(pickle.dumps(results))


if __name__ == "__main__":
    _main(*sys.argv[1:3])
