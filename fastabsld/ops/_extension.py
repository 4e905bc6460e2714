"""Loads the compiled extension ``fastabsld._C`` (the C++ and CUDA kernels), if it was built.

Without it the package still works: every op falls back to its plain PyTorch kernel (in its
``fastabsld.ops`` module), and one warning says so and why.
"""

import importlib
import importlib.util
import warnings

import torch  # noqa: F401  (the extension links against torch's libraries)

try:
    if importlib.util.find_spec("fastabsld._C") is None:
        raise ImportError("it was not built: no fastabsld/_C*.so next to the package")
    importlib.import_module("fastabsld._C")  # loading registers torch.ops.fastabsld.*
    HAS_EXTENSION = True
    EXTENSION_ERROR = None
except ImportError as error:  # not built, or built against another torch
    HAS_EXTENSION = False
    EXTENSION_ERROR = error
    warnings.warn(
        "fastabsld: the compiled extension fastabsld._C is not available "
        f"({error}); using the pure-PyTorch fallback, which is slower. "
        "Build it with `pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cuda_kernels():
    """Tells whether the extension holds CUDA kernels.

    Returns:
        bool: True when ``fastabsld._C`` was built with its CUDA sources.
    """
    if not HAS_EXTENSION:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastabsld::pgd_step", "CUDA")
