"""fastabsld: Anti-Bias Soft Label Distillation (ABSLD) with fused kernels.

The library, importable from here:

- losses: :func:`kd_kl_div` and :class:`KDLoss` (``fastabsld.loss``), the methods :class:`ABSLDLoss`,
  :class:`TRADESLoss`, :class:`ARDLoss`, :class:`IADLoss` and Fair-ARD's :class:`FairReweight`
  (``fastabsld.methods``), the temperature update (``fastabsld.temperature``);
- attacks: :func:`pgd`, :func:`pgd_loop`, :func:`fgsm` and their losses (``fastabsld.attack``) on the
  fused step :func:`pgd_step` (``fastabsld.ops``);
- fairness metrics (``fastabsld.metrics``) and :func:`evaluate` (``fastabsld.evaluation``).

``fastabsld.ops`` is the boundary to the kernels (C++, CUDA, Triton, and plain PyTorch fallbacks);
``fastabsld.reference`` states what each op computes (the tests' oracle); ``fastabsld.recipe`` is the
training recipe and its command line, imported only when used. Names are loaded on first use.
"""

import importlib

from fastabsld.ops._extension import HAS_EXTENSION, has_cuda_kernels
from fastabsld.ops._kernels import HAS_TRITON

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access: the attacks pull in tqdm).
_EXPORTS = {
    "kd_kl_div": "fastabsld.ops.kd_loss", "kd_kl_div_forward": "fastabsld.ops.kd_loss",
    "pgd_step": "fastabsld.ops.pgd", "KDLoss": "fastabsld.loss", "ABSLDLoss": "fastabsld.methods.absld",
    "BetaDecay": "fastabsld.methods.absld",
    "TRADESLoss": "fastabsld.methods.trades", "ARDLoss": "fastabsld.methods.ard", "IADLoss": "fastabsld.methods.iad",
    "FairReweight": "fastabsld.methods.fair",
    "anti_bias_update": "fastabsld.temperature", "accumulate_class_risk": "fastabsld.temperature",
    "pgd": "fastabsld.attack", "pgd_loop": "fastabsld.attack", "fgsm": "fastabsld.attack",
    "ce_loss": "fastabsld.attack", "kl_loss": "fastabsld.attack", "cw_loss": "fastabsld.attack",
    "ClassAccuracy": "fastabsld.metrics", "nsd": "fastabsld.metrics",
    "per_class_accuracy": "fastabsld.metrics", "worst_class_accuracy": "fastabsld.metrics",
    "evaluate": "fastabsld.evaluation",
}
_SUBMODULES = ("attack", "evaluation", "loss", "methods", "metrics", "ops", "recipe", "reference", "temperature")

__all__ = sorted(_EXPORTS) + ["HAS_EXTENSION", "HAS_TRITON", "has_cuda_kernels", "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"fastabsld.{name}")
    raise AttributeError(f"module 'fastabsld' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
