"""TRADES (Zhang et al., ICML 2019): adversarial training with a clean cross-entropy and a KL smoothness term.

Paper (notation of the paper: f the classifier, beta = 1/lambda)::

    min_f  E[ CE(f(X), Y) + beta * max_{X' in B(X, eps)} KL(f(X) || f(X')) ]

where f(.) denotes the softmax output and KL(P || Q) = sum_c P_c log(P_c / Q_c) (the paper writes the
surrogate as L(f(X), f(X')) / lambda).

The official code (``yaodongyu/TRADES``, ``trades.py``, ``trades_loss``), which this module follows:

- Inner maximisation, model in eval mode: ``x' = x + 0.001 * N(0, 1)`` (a small Gaussian start, not
  clamped to the box, not a uniform draw in the eps-ball), then ``steps`` times
  ``x' <- clip_[0,1](clip_[x-eps, x+eps](x' + alpha * sign(grad_x' L)))`` with
  ``L = sum_i KL(softmax(f(x)_i) || softmax(f(x')_i))``: ``nn.KLDivLoss(size_average=False)`` of
  ``log_softmax(f(x'))`` against ``softmax(f(x))``, summed over the batch and the classes. f(x) does
  not depend on x', so it is computed once here (:func:`trades_attack_loss`).
- Outer loss, model in train mode::

      loss = CE_mean(f(x), y) + beta * (1/B) * sum_i KL(softmax(f(x)_i) || softmax(f(x')_i))

  The KL is the same direction as in the attack; its target softmax(f(x)) is *not* detached, so the
  gradient flows through both f(x) and f(x') (and through f(x) in the CE term too).
- CIFAR-10 settings of the paper: eps = 0.031, alpha = 0.007, 10 steps, beta = 6 (the script's
  argparse default is beta = 1; the RobustBench WRN-34-10 teacher used beta = 6).

Choices here: the attack's default start is the official ``"normal"`` (``x + 0.001 N(0, 1)``); a
uniform start in the eps-ball can be asked for with ``random_start="uniform"``. For ``norm="l2"``
the steps are fastabsld's normalised-gradient steps, not the official L2 routine (an SGD optimiser
on the perturbation with renormalisation). The KL is the exact fused ``kd_kl_div``. TRADES trains a
robust teacher as well as any model; nothing here is specific to students.
"""

import torch
from torch import nn

from fastabsld.attack import pgd
from fastabsld.methods._inputs import check_batch
from fastabsld.methods._weighting import weighted_ce
from fastabsld.ops.checks import check_real
from fastabsld.ops.kd_loss import kd_kl_div

RANDOM_START = "normal"


def trades_attack_loss(nat_logits):
    """The TRADES inner objective: ``sum_i KL(softmax(nat_logits_i) || softmax(logits_i))``, for ``pgd``.

    Args:
        nat_logits: (B, C) logits of the attacked model on the clean inputs (detached here).

    Returns:
        callable: ``loss_fn(logits) -> scalar`` to maximise.
    """
    if not isinstance(nat_logits, torch.Tensor) or nat_logits.dim() != 2:
        raise ValueError(f"nat_logits must be a (B, C) tensor, got {getattr(nat_logits, 'shape', type(nat_logits))}")
    target = nat_logits.detach()

    def loss_fn(logits):
        return kd_kl_div(logits, target, reduction="sum")

    return loss_fn


def trades_attack(model, x, *, eps, alpha, steps, norm="linf", random_start=RANDOM_START, clamp=(0.0, 1.0),
                  generator=None):
    """The TRADES inner maximisation: PGD on the KL from the model's clean softmax.

    The model runs in the mode the caller left it (the official code attacks in eval mode).

    Args:
        model: callable mapping inputs (B, ...) to logits.
        x: clean inputs (B, ...).
        eps: radius (number or (B,) tensor).
        alpha: step size (number or (B,) tensor).
        steps: number of ascent steps.
        norm: "linf" or "l2".
        random_start: "normal" (official), "uniform" or "none".
        clamp: (min, max) of the valid input range.
        generator: torch.Generator of the start, or None for the global one.

    Returns:
        Tensor: the adversarial inputs, detached.
    """
    with torch.no_grad():
        nat_logits = model(x)
    return pgd(model, x, trades_attack_loss(nat_logits), eps=eps, alpha=alpha, steps=steps, norm=norm,
               random_start=random_start, clamp=clamp, generator=generator, eval_mode=False)


class TRADESLoss(nn.Module):
    """The TRADES outer loss ``CE(nat_logits, y) + beta * (1/B) sum_i KL(softmax(nat_i) || softmax(adv_i))``.

    Gradients flow into both ``adv_logits`` and ``nat_logits`` (the KL's target included), as in
    the official code. With ``sample_weight`` each row of both terms is multiplied by its weight
    before the division by B.

    Args:
        beta: weight of the KL term (1/lambda in the paper; 6 for CIFAR-10).
    """

    def __init__(self, beta=6.0):
        super().__init__()
        self.beta = check_real(beta, "beta", minimum=0.0)

    def extra_repr(self):
        return f"beta={self.beta:.4g}"

    def forward(self, adv_logits, nat_logits, labels, sample_weight=None):
        """The TRADES loss of one batch.

        Args:
            adv_logits: (B, C) logits of the model (train mode) on the adversarial inputs.
            nat_logits: (B, C) logits of the model (train mode) on the clean inputs.
            labels: (B,) integer labels in [0, C).
            sample_weight: (B,) per-sample weights, or None.

        Returns:
            Tensor: the scalar loss, fp32 (fp64 for fp64 logits).
        """
        weight = check_batch(labels, sample_weight=sample_weight, adv_logits=adv_logits, nat_logits=nat_logits)
        robust = kd_kl_div(adv_logits, nat_logits, reduction="batchmean", sample_weight=weight)
        return weighted_ce(nat_logits, labels, weight) + self.beta * robust
