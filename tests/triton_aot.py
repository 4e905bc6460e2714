"""Compiles Triton kernels ahead of time for real GPUs, without a GPU.

Kernels that run in the interpreter may still fail to compile for a GPU (interpreter-only
code); every kernel test also compiles its kernel for sm_80 and sm_90 here.
"""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGETS = (80, 90)


def compile_for_gpus(kernel, signature, constexprs, targets=TARGETS):
    """Compiles a ``@triton.jit`` kernel to cubin for each compute capability in ``targets``.

    Args:
        kernel: the decorated kernel (a JITFunction, or the interpreter's wrapper of one).
        signature: ``{argument: type}`` for every argument, e.g. ``"*fp32"``, ``"i32"``,
            ``"fp32"``, and ``"constexpr"`` for compile-time constants.
        constexprs: ``{argument: value}`` for the compile-time constants.
        targets: compute capabilities, e.g. (80, 90).

    Returns:
        dict: ``{capability: compiled kernel}``; each has ``asm["ptx"]`` and ``asm["cubin"]``.
    """
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    compiled = {}
    for capability in targets:
        source = ASTSource(fn, signature=dict(signature), constexprs=dict(constexprs))
        compiled[capability] = triton.compile(source, target=GPUTarget("cuda", capability, 32))
        assert compiled[capability].asm["cubin"], f"no cubin for sm_{capability}"
    return compiled
