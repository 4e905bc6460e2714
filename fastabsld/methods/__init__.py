"""Robust distillation and adversarial training methods as loss modules on the fused ops.

- ABSLD (and RSLAD, its beta = 0 case): :class:`ABSLDLoss` (``fastabsld.methods.absld``);
- TRADES: :class:`TRADESLoss`, :func:`trades_attack_loss`, :func:`trades_attack` (``.trades``);
- ARD: :class:`ARDLoss`, :func:`ard_attack_loss` (``.ard``);
- IAD (IAD-I): :class:`IADLoss` (``.iad``);
- Fair-ARD's class re-weighting for any of the distillation losses: :class:`FairReweight` (``.fair``).

Each method is one module holding its loss (and, where it has one, its per-class state such as
temperatures or class weights), with its published formulas and the official code's choices in the
module docstring.
"""

from fastabsld.methods.absld import ABSLDLoss, BetaDecay
from fastabsld.methods.ard import ARDLoss, ard_attack_loss
from fastabsld.methods.fair import FairReweight
from fastabsld.methods.iad import IADLoss
from fastabsld.methods.trades import TRADESLoss, trades_attack, trades_attack_loss

__all__ = ["ABSLDLoss", "ARDLoss", "BetaDecay", "FairReweight", "IADLoss", "TRADESLoss", "ard_attack_loss",
           "trades_attack", "trades_attack_loss"]
