"""Triton kernels of fastabsld (installed as ``fastabsld.kernels``).

They run on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before this package is imported). ``HAS_TRITON`` is False where
triton is not installed; the package then imports only ``kd_kl_div_checks`` (torch only: the
value checks the op's fallback shares with the Triton launcher).
"""

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
