"""Compiles Triton kernels ahead of time for real GPUs, without a GPU.

Kernels that run in the interpreter may still fail to compile for a GPU (interpreter-only
code); every kernel test also compiles its kernel for sm_80 and sm_90 here.
"""

import contextlib
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

TARGETS = (80, 90)


def _jit_function(kernel):
    """The JITFunction of a kernel or of the interpreter's wrapper of one."""
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


@contextlib.contextmanager
def _jit_helpers(fn):
    """Swaps JITFunctions in for the interpreter's wrappers of ``@triton.jit`` functions.

    Under TRITON_INTERPRET=1 every ``@triton.jit`` function is an interpreter wrapper: the
    helpers that a kernel calls (in its module) and triton.language's own jit functions
    (``tl.max``, ``tl.sum``, ...); the compiler cannot call those, so for the compile the
    modules hold JITFunctions instead.
    """
    namespaces = [fn.fn.__globals__] + [vars(module) for name, module in list(sys.modules.items())
                                        if name == "triton.language" or name.startswith("triton.language.")]
    swapped = [(namespace, {name: value for name, value in namespace.items() if isinstance(value, InterpretedFunction)})
               for namespace in namespaces]
    try:
        for namespace, wrappers in swapped:
            namespace.update({name: JITFunction(value.fn) for name, value in wrappers.items()})
        yield
    finally:
        for namespace, wrappers in swapped:
            namespace.update(wrappers)


def compile_for_gpus(kernel, signature, constexprs, targets=TARGETS, options=None, divisible_by_16=()):
    """Compiles a ``@triton.jit`` kernel to cubin for each compute capability in ``targets``.

    Args:
        kernel: the decorated kernel (a JITFunction, or the interpreter's wrapper of one).
        signature: ``{argument: type}`` for every argument, e.g. ``"*fp32"``, ``"i32"``,
            ``"fp32"``, and ``"constexpr"`` for compile-time constants.
        constexprs: ``{argument: value}`` for the compile-time constants.
        targets: compute capabilities, e.g. (80, 90).
        options: compile options as a launch would pass them, e.g. ``{"num_warps": 8,
            "debug": True}``; None for the defaults.
        divisible_by_16: names of pointer or integer arguments to specialise as multiples of 16,
            as a launch does for aligned tensors and such integers (it enables vector accesses).

    Returns:
        dict: ``{capability: compiled kernel}``; each has ``asm["ptx"]`` and ``asm["cubin"]``.
    """
    fn = _jit_function(kernel)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    compiled = {}
    with _jit_helpers(fn):
        for capability in targets:
            source = ASTSource(fn, signature=dict(signature), constexprs=dict(constexprs), attrs=attrs)
            compiled[capability] = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                                  options=dict(options or {}))
            assert compiled[capability].asm["cubin"], f"no cubin for sm_{capability}"
    return compiled
