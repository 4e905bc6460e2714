"""Robust distillation methods as loss modules on the fused ops: ABSLD (and RSLAD, its beta = 0 case).

Each method is one module holding its loss (and, where it has one, its per-class state such as
temperatures), with its published formulas in the module docstring.
"""

from fastabsld.methods.absld import ABSLDLoss, BetaDecay

__all__ = ["ABSLDLoss", "BetaDecay"]
