"""Compiles Triton kernels ahead of time for real GPUs, without a GPU, and reads what ptxas made.

Kernels that run in the interpreter may still fail to compile for a GPU (interpreter-only
code); every kernel test also compiles its kernel for sm_80 and sm_90 here.

``compile_launches`` compiles exactly the variant a real launch would: it binds the launch's
arguments with Triton's own binder (``native_specialize_impl``: integers equal to 1 become
constants, pointers and integers divisible by 16 get ``tt.divisibility``, integers are i32 or i64
by value; ``do_not_specialize`` respected) and packs them as ``JITFunction.run`` does, for the
target GPU instead of the current one. ``resource_usage`` reads registers, stack (spills) and
shared memory of a cubin with the ``cuobjdump`` that ships with Triton.

Under TRITON_INTERPRET=1 the compile runs in fresh Python processes without it: there every
``@triton.jit`` function (a kernel's helpers, and triton.language's own such as ``tl.max``) is
a real JITFunction, and the interpreter's patches of triton.language cannot leak in (calling
an interpreted ``tl.max`` leaves triton.language.core patched for the rest of the process).
"""

import importlib
import os
import pickle
import re
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
# Fresh processes a batch of compiles is spread over (the compiles are single-threaded).
WORKERS = 2


class TensorStandIn:
    """What a launch's specialisation sees of a tensor: its dtype and its address modulo 16."""

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self.address = tensor.data_ptr() % 16

    def data_ptr(self):
        """The address modulo 16 (all Triton's pointer specialisation looks at)."""
        return self.address


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
        dict: ``{capability: compiled kernel}``; each has ``asm["ptx"]``, ``asm["cubin"]``,
        ``metadata`` (shared, num_warps, num_stages) and ``resources`` (see ``resource_usage``).
    """
    job = {"kernel": kernel, "signature": signature, "constexprs": constexprs, "options": options,
           "divisible_by_16": divisible_by_16}
    return compile_many_for_gpus([job], targets)[0]


def compile_launches(launches, targets=TARGETS):
    """Compiles the variant each launch would compile on a GPU of each capability in ``targets``.

    Args:
        launches: objects with ``kernel`` (a ``@triton.jit`` kernel), ``args`` (the positional
            arguments: tensors, possibly on the meta device, and numbers), ``constexprs`` (the
            constexpr keyword arguments) and ``options()`` (num_warps, num_stages, debug, ...),
            such as ``fastabsld.kernels.kd_kl_div.Launch``.
        targets: compute capabilities.

    Returns:
        list: for each launch, ``{capability: compiled kernel}`` as ``compile_for_gpus``, each
        also with the ``signature``, ``constexprs`` and ``attrs`` the launch specialised on.
    """
    jobs, job_of_key, job_of_launch = [], {}, []
    for launch in launches:
        args = tuple(_stand_in(a) for a in launch.args)
        kwargs = dict(launch.constexprs, **launch.options())
        key = _variant_key(launch.kernel, args, kwargs)
        if key not in job_of_key:  # launches that differ only in runtime values compile once
            job_of_key[key] = len(jobs)
            jobs.append({"kernel": launch.kernel, "launch_args": args, "launch_kwargs": kwargs})
        job_of_launch.append(job_of_key[key])
    compiled = compile_many_for_gpus(jobs, targets)
    return [compiled[index] for index in job_of_launch]


def _variant_key(kernel, args, kwargs):
    """A key at least as fine as Triton's specialisation (equal keys compile the same variant)."""
    # a JITFunction has do_not_specialize; the interpreter's wrapper keeps it in kwargs
    fixed = set(getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize")
                or ())
    names = getattr(kernel, "arg_names", [None] * len(args))

    def describe(name, arg):
        if isinstance(arg, TensorStandIn):
            return (str(arg.dtype), arg.address % 16 == 0)
        if isinstance(arg, bool) or not isinstance(arg, int):
            return (type(arg).__name__,)
        if name in fixed:
            return ("int", -2**31 <= arg < 2**31)
        return ("int", arg == 1, arg % 16 == 0, -2**31 <= arg < 2**31)
    name = kernel if isinstance(kernel, tuple) else (kernel.fn.__module__, kernel.fn.__name__)
    return (name, tuple(describe(n, a) for n, a in zip(names, args)),
            tuple(sorted((k, repr(v)) for k, v in kwargs.items())))


def compile_many_for_gpus(jobs, targets=TARGETS):
    """``compile_for_gpus`` for several kernels or variants at once (fresh processes under the interpreter).

    Args:
        jobs: dicts with the keys ``kernel``, ``signature``, ``constexprs`` and optionally
            ``options`` and ``divisible_by_16``, as the arguments of ``compile_for_gpus``; or
            ``kernel``, ``launch_args`` and ``launch_kwargs`` to specialise like a launch.
        targets: compute capabilities.

    Returns:
        list: for each job, ``{capability: compiled kernel}`` (asm, metadata, resources).
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _compile_in_fresh_processes(jobs, targets)
    return _compile_all(jobs, targets)


def resource_usage(cubin):
    """Registers, stack, local and shared memory of the kernel in a cubin, by ``cuobjdump``.

    Spilled registers live in the stack frame (local memory): ``stack`` and ``local`` are 0
    exactly when ptxas spilled nothing.

    Args:
        cubin: the cubin's bytes.

    Returns:
        dict: registers (per thread), stack and local (bytes per thread), shared (static bytes per CTA).
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "kernel.cubin")
        path.write_bytes(cubin)
        done = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)],
                              capture_output=True, text=True, check=True)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", done.stdout)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{done.stdout}")
    registers, stack, shared, local = (int(x) for x in found.groups())
    return {"registers": registers, "stack": stack, "local": local, "shared": shared}


def _stand_in(arg):
    return TensorStandIn(arg) if hasattr(arg, "data_ptr") and hasattr(arg, "dtype") else arg


def _real_kernel(kernel):
    if isinstance(kernel, tuple):
        module, name = kernel
        kernel = getattr(importlib.import_module(module), name)
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _specialise(fn, args, kwargs, target):
    """(signature, constexprs, attrs, options) as ``JITFunction.run`` packs them for ``target``."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _compile_one(job, capability):
    fn = _real_kernel(job["kernel"])
    target = GPUTarget("cuda", capability, 32)
    if "launch_args" in job:
        signature, constexprs, attrs, options = _specialise(fn, job["launch_args"], job["launch_kwargs"], target)
    else:
        signature, constexprs = dict(job["signature"]), dict(job["constexprs"])
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in job.get("divisible_by_16", ())}
        options = dict(job.get("options") or {})
    kernel = triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs), target=target,
                            options=options)
    assert kernel.asm["cubin"], f"no cubin for sm_{capability}"
    names = fn.arg_names
    return {"asm": {"ptx": kernel.asm["ptx"], "cubin": kernel.asm["cubin"], "ttgir": kernel.asm.get("ttgir", "")},
            "metadata": {"shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps,
                         "num_stages": kernel.metadata.num_stages},
            "resources": resource_usage(kernel.asm["cubin"]),
            "signature": dict(signature),
            "constexprs": {names[k[0]] if isinstance(k, tuple) and len(k) == 1 else k: v
                           for k, v in constexprs.items()},
            "attrs": {names[k[0]] if isinstance(k, tuple) and len(k) == 1 else k: v for k, v in attrs.items()}}


def _compile_all(jobs, targets):
    return [{capability: types.SimpleNamespace(**_compile_one(job, capability)) for capability in targets}
            for job in jobs]


def _portable(job):
    kernel = job["kernel"]
    if not isinstance(kernel, tuple):
        kernel = (kernel.fn.__module__, kernel.fn.__name__)
    return dict(job, kernel=kernel)


def _compile_in_fresh_processes(jobs, targets):
    portable = [_portable(job) for job in jobs]
    shares = [list(range(len(jobs)))[w::WORKERS] for w in range(min(WORKERS, len(jobs)))]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = [None] * len(jobs)
    with tempfile.TemporaryDirectory() as folder:
        running = []
        for worker, share in enumerate(shares):
            request, reply = Path(folder, f"jobs{worker}.pkl"), Path(folder, f"compiled{worker}.pkl")
            request.write_bytes(pickle.dumps(([portable[i] for i in share], tuple(targets))))
            process = subprocess.Popen([sys.executable, "-m", "tests.triton_aot", str(request), str(reply)], cwd=ROOT,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((share, reply, process))
        failures = []
        for share, reply, process in running:
            _, stderr = process.communicate()
            if process.returncode != 0:
                failures.append(stderr[-6000:])
                continue
            for index, result in zip(share, pickle.loads(reply.read_bytes())):
                results[index] = result
        if failures:
            raise RuntimeError("ahead-of-time compile failed:\n" + "\n".join(failures))
    return [{capability: types.SimpleNamespace(**compiled) for capability, compiled in result.items()}
            for result in results]


def _main(request, reply):
    jobs, targets = pickle.loads(Path(request).read_bytes())
    results = [{capability: _compile_one(job, capability) for capability in targets} for job in jobs]
    Path(reply).write_bytes(pickle.dumps(results))


if __name__ == "__main__":
    _main(*sys.argv[1:3])
