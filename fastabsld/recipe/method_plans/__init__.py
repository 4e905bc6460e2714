"""The training methods of the recipe, one plan per method (``fastabsld.methods`` holds their losses).

A plan (:class:`~fastabsld.recipe.method_plans.base.MethodPlan`) says how a method builds its loss state,
what one batch computes (attack and loss in the named phases ``teacher``, ``labels``, ``attack``,
``student``, ``loss``), what happens at each epoch's start and end, and what ``last.pt`` keeps of it. The
epoch loop (``fastabsld.recipe.loop``) and the step (``fastabsld.recipe.steps``) only call plans:

- ``absld``, ``rslad``: :mod:`.absld`;
- ``pgd-at``: :mod:`.pgd_at`;
- ``trades``: :mod:`.trades`;
- ``ard``: :mod:`.ard`;
- ``iad``: :mod:`.iad`;
- Fair-ARD's class re-weighting of the distillation methods (``TrainConfig.reweight``): :mod:`.reweight`.
"""

from fastabsld.recipe.method_plans.absld import ABSLDPlan
from fastabsld.recipe.method_plans.ard import ARDPlan
from fastabsld.recipe.method_plans.base import MethodPlan
from fastabsld.recipe.method_plans.iad import IADPlan
from fastabsld.recipe.method_plans.pgd_at import PGDATPlan
from fastabsld.recipe.method_plans.trades import TRADESPlan

PLANS = {plan.name: plan for plan in (ABSLDPlan("absld"), ABSLDPlan("rslad"), PGDATPlan(), TRADESPlan(), ARDPlan(),
                                      IADPlan())}

__all__ = ["MethodPlan", "PLANS", "plan_for"]


def plan_for(method):
    """The plan of a method.

    Args:
        method: ``TrainConfig.method`` (already validated by the config).

    Returns:
        MethodPlan: the method's plan.
    """
    return PLANS[method]
