"""fastabsld: Anti-Bias Soft Label Distillation (ABSLD) with fused kernels.

Public modules: ``fastabsld.loss`` (KD losses), ``fastabsld.ops`` (the custom ops),
``fastabsld.attack`` (PGD and friends), ``fastabsld.reference`` (plain PyTorch math).
"""

from fastabsld._extension import HAS_EXTENSION, has_cuda_kernels
from fastabsld.kernels import HAS_TRITON

__version__ = "0.1.0"

__all__ = ["HAS_EXTENSION", "HAS_TRITON", "has_cuda_kernels", "__version__"]
