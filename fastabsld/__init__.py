"""fastabsld: Anti-Bias Soft Label Distillation (ABSLD) with fused kernels.

Public modules: ``fastabsld.loss`` (KD losses), ``fastabsld.ops`` (the custom ops),
``fastabsld.attack`` (PGD and friends), ``fastabsld.reference`` (plain PyTorch math),
``fastabsld.metrics`` (per-class accuracy, worst class, NSD); ``fastabsld.evaluate`` (robustness and
fairness evaluation, imported on first use).
"""

from fastabsld._extension import HAS_EXTENSION, has_cuda_kernels
from fastabsld.kernels import HAS_TRITON

__version__ = "0.1.0"

__all__ = ["HAS_EXTENSION", "HAS_TRITON", "evaluate", "has_cuda_kernels", "__version__"]


def __getattr__(name):
    # Lazy: ``evaluate`` pulls in the attacks and tqdm, which plain loss users do not need.
    if name == "evaluate":
        from fastabsld.evaluation import evaluate

        return evaluate
    raise AttributeError(f"module 'fastabsld' has no attribute {name!r}")
