"""The ABSLD objective as a module holding the class-wise temperatures and the class risks."""

import torch
from torch import nn

from fastabsld.ops.checks import (
    check_choice,
    check_int,
    check_label_range,
    check_real,
    compute_dtype,
    describe,
    is_integer_tensor,
)
from fastabsld.methods._weighting import check_sample_weight
from fastabsld.ops.kd_loss import kd_kl_div
from fastabsld.temperature import (
    accumulate_class_risk,
    anti_bias_update,
    check_beta,
    check_temperature_bounds,
)

TEMPERATURE_MODES = ("paper", "released")
BRANCHES = ("adv", "nat")
# The buffers that keep at least fp32 precision when the module is cast (see ``ABSLDLoss._apply``).
STATE_BUFFERS = ("tau_adv", "tau_nat", "risk_adv", "risk_nat")
# "mean" is the released reduction (per-element mean over B * C), the others are kd_kl_div's.
REDUCTIONS = ("mean", "batchmean", "sum", "none")


class ABSLDLoss(nn.Module):
    """Anti-Bias Soft Label Distillation loss with per-class teacher temperatures.

    ``loss = adv_weight * KL(adv_logits, p_adv) + nat_weight * KL(nat_logits, p_nat)``
    with ``p_branch[i] = softmax(teacher_logits[i] / tau_branch[labels[i]])`` and KL reduced by
    ``reduction``: by default the released "mean" (row KL summed over the batch, divided by
    B * C: 1/C of what ``nn.KLDivLoss(reduction="batchmean")`` gives), or ``"batchmean"``
    (divided by B), ``"sum"``, or ``"none"`` (the (B,) weighted row losses). The released code
    computes ``mean(p * (log(p + 1e-5) - log q))``: this module gives the exact KL, which differs
    from it by less than 1e-5 in value and not at all in gradient.

    In training mode, ``forward`` also adds each sample's cross-entropy (student logits against
    the hard label) to its class's entry of ``risk_adv`` / ``risk_nat``, on the device.
    ``update_temperatures()`` (once per epoch) moves the temperatures against the risks and
    resets them.

    ``temperature_mode``:
        - ``"paper"``: the adversarial branch uses ``tau_adv``, the natural branch ``tau_nat``.
        - ``"released"``: reproduces the authors' released script, in which tensor aliasing
          makes both branches divide the teacher logits by ``tau_adv[y] * tau_nat[y]``. Both
          vectors are still updated from their own risks. Use it to reproduce published numbers.

    ``forward``'s ``sample_weight`` multiplies each sample's rows of both KL terms: with
    :class:`fastabsld.methods.fair.FairReweight` it gives Fair-RSLAD (beta = 0) and ABSLD combined with
    Fair-ARD's sample-based re-weighting, the integration of the label-based ABSLD with sample-based
    methods that the 2025 journal version of ABSLD (arXiv 2506.08611) puts forward; the weights
    multiply both KL terms as in Fair-RSLAD, and the class risks stay unweighted.

    ``beta`` is a plain attribute (scale it with the learning rate: :class:`BetaDecay` does it)
    and is saved in ``state_dict`` (as extra state) together with the buffers ``tau_adv``,
    ``tau_nat``, ``risk_adv`` and ``risk_nat``. Those four stay fp32 when the module is cast to a
    16-bit dtype (``.to(torch.bfloat16)``, ``.half()``): risk sums over an epoch need fp32's mantissa.

    Args:
        num_classes: C >= 1.
        adv_weight: weight of the adversarial branch (5/6 in the paper).
        nat_weight: weight of the natural branch (1/6 in the paper).
        tau_init: initial temperature of every class.
        tau_min: lower clamp of the temperatures.
        tau_max: upper clamp of the temperatures.
        beta: step size of the anti-bias update.
        temperature_mode: ``"paper"`` or ``"released"`` (see above).
        reduction: ``"mean"`` (the released per-element mean, default), ``"batchmean"``, ``"sum"``
            or ``"none"``. The gradient scales with it (``"batchmean"`` is C times ``"mean"``), so a
            learning rate tuned for one needs rescaling for another.
    """

    def __init__(self, num_classes, *, adv_weight=5 / 6, nat_weight=1 / 6, tau_init=1.0, tau_min=0.5, tau_max=5.0,
                 beta=0.1, temperature_mode="paper", reduction="mean"):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", minimum=1)
        # A negative weight turns a term into one the student maximises: never a sensible setting.
        self.adv_weight = check_real(adv_weight, "adv_weight", minimum=0)
        self.nat_weight = check_real(nat_weight, "nat_weight", minimum=0)
        check_temperature_bounds(tau_min, tau_max, tau_init)
        check_beta(beta)
        check_choice(temperature_mode, "temperature_mode", TEMPERATURE_MODES)
        check_choice(reduction, "reduction", REDUCTIONS)
        self.reduction = reduction
        self.tau_min = float(tau_min)
        self.tau_max = float(tau_max)
        self.beta = float(beta)
        self.temperature_mode = temperature_mode
        self.register_buffer("tau_adv", torch.full((num_classes,), float(tau_init)))
        self.register_buffer("tau_nat", torch.full((num_classes,), float(tau_init)))
        self.register_buffer("risk_adv", torch.zeros(num_classes))
        self.register_buffer("risk_nat", torch.zeros(num_classes))

    def _apply(self, fn, recurse=True):
        # The temperatures and the class risks stay fp32 (or wider) whatever dtype the module is cast to:
        # a bf16 risk sum stops growing after a few hundred batches (8 mantissa bits), and bf16 temperatures
        # would round every update. Device moves apply as usual.
        kept = {name: self._buffers[name] for name in STATE_BUFFERS}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype and torch.finfo(after.dtype).bits < 32:
                self._buffers[name] = before.to(device=after.device, dtype=torch.float32)
        return self

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, adv_weight={self.adv_weight:.4g}, "
                f"nat_weight={self.nat_weight:.4g}, tau=[{self.tau_min}, {self.tau_max}], beta={self.beta:.4g}, "
                f"temperature_mode={self.temperature_mode!r}, reduction={self.reduction!r}")

    def get_extra_state(self):
        return {"beta": self.beta}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or "beta" not in state:
            raise ValueError(f"ABSLDLoss extra state must be a dict with key 'beta' (as get_extra_state "
                             f"returns), got {state!r:.200}")
        check_beta(state["beta"])
        self.beta = float(state["beta"])

    def branch_temperature(self, branch):
        """The (C,) class temperatures that divide the teacher logits in one branch.

        Args:
            branch: ``"adv"`` or ``"nat"``.

        Returns:
            Tensor: (C,) temperatures (``tau_adv * tau_nat`` for both branches in released mode).
        """
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        if self.temperature_mode == "released":
            return self.tau_adv * self.tau_nat
        return self.tau_adv if branch == "adv" else self.tau_nat

    def _check_inputs(self, labels, **logits):
        if not is_integer_tensor(labels) or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D integer tensor, got {describe(labels)}")
        expected = (labels.shape[0], self.num_classes)
        for name, value in logits.items():
            if tuple(value.shape) != expected:
                raise ValueError(f"{name} must have shape (B, C) = {expected} for labels of shape "
                                 f"{tuple(labels.shape)} and num_classes={self.num_classes}, got {tuple(value.shape)}")
        # -100 too: the loss has no ignore_index (kd_kl_div would skip the row, the risk update would fail).
        check_label_range(labels, self.num_classes)

    def teacher_probs(self, teacher_logits, labels, branch="adv"):
        """The teacher's soft labels of one branch: ``softmax(teacher_logits / tau_branch[labels])``.

        Args:
            teacher_logits: (B, C) teacher logits.
            labels: (B,) integer labels in [0, C).
            branch: ``"adv"`` (the labels the inner attack and the adversarial term use) or ``"nat"``.

        Returns:
            Tensor: (B, C) probabilities, fp32 (fp64 for fp64 logits).
        """
        self._check_inputs(labels, teacher_logits=teacher_logits)
        compute = compute_dtype(teacher_logits)
        # index_select, not indexing: a negative label must fail (on CUDA, a device-side assert), not wrap.
        tau = self.branch_temperature(branch).index_select(0, labels.long()).to(compute).unsqueeze(1)
        return torch.softmax(teacher_logits.to(compute) / tau, dim=1)

    def forward(self, adv_logits, nat_logits, teacher_logits, labels, sample_weight=None):
        """The ABSLD loss of one batch (and, in training mode, the risk accumulation).

        Args:
            adv_logits: (B, C) student logits on the adversarial inputs.
            nat_logits: (B, C) student logits on the natural inputs.
            teacher_logits: (B, C) teacher logits on the natural inputs.
            labels: (B,) integer labels in [0, C).
            sample_weight: (B,) per-sample weights of both KL terms (e.g. Fair-ARD's
                ``FairReweight.sample_weight(labels)``: fair-rslad, or ABSLD with re-weighting), or None.
                Each row's KL is multiplied by its weight before the reduction (whose denominator does
                not change); the class risks stay unweighted.

        Returns:
            Tensor: the loss (fp32, fp64 for fp64 logits): a scalar, or (B,) with ``reduction="none"``.
        """
        self._check_inputs(labels, adv_logits=adv_logits, nat_logits=nat_logits, teacher_logits=teacher_logits)
        weight = check_sample_weight(sample_weight, labels.shape[0], adv_logits.device)
        adv = kd_kl_div(adv_logits, teacher_logits, labels=labels, teacher_temperature=self.branch_temperature("adv"),
                        reduction=self.reduction, sample_weight=weight)
        nat = kd_kl_div(nat_logits, teacher_logits, labels=labels, teacher_temperature=self.branch_temperature("nat"),
                        reduction=self.reduction, sample_weight=weight)
        if self.training:
            accumulate_class_risk(self.risk_adv, adv_logits, labels)
            accumulate_class_risk(self.risk_nat, nat_logits, labels)
        return self.adv_weight * adv + self.nat_weight * nat

    @torch.no_grad()
    def update_temperatures(self, group=None):
        """The once-per-epoch anti-bias update of ``tau_adv`` and ``tau_nat``; resets the risks.

        Under ``torch.distributed`` (when initialised) the risks are first summed over the ranks
        of ``group``, so every rank computes the same temperatures. Call it on every rank.

        Args:
            group: process group for the all-reduce, or None for the default group.
        """
        risks = torch.stack([self.risk_adv, self.risk_nat])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(risks, op=torch.distributed.ReduceOp.SUM, group=group)
        for tau, risk in ((self.tau_adv, risks[0]), (self.tau_nat, risks[1])):
            tau.copy_(anti_bias_update(tau, risk, self.beta, self.tau_min, self.tau_max))
        self.risk_adv.zero_()
        self.risk_nat.zero_()


class BetaDecay:
    """Decays an :class:`ABSLDLoss`'s ``beta`` together with the learning rate, as the released recipe does.

    The released script multiplies beta by the LR factor (0.1) at each LR milestone. After every
    ``scheduler.step()``, :meth:`step` sets ``loss_fn.beta = beta0 * lr / lr0`` (the first parameter
    group's learning rate over its initial one), so with ``MultiStepLR`` beta drops by ``gamma`` at
    exactly the scheduler's milestones, and with any other scheduler it follows the same ratio.

    ``beta0`` is derived when the helper is built: ``loss_fn.beta * lr0 / lr``. Built after restoring
    the loss, the optimiser and the scheduler from a checkpoint, it continues the decay where it was.

    Args:
        loss_fn: the ABSLDLoss whose ``beta`` follows the learning rate.
        scheduler: a ``torch.optim.lr_scheduler`` scheduler (``base_lrs`` and its optimiser are read).
    """

    def __init__(self, loss_fn, scheduler):
        if not isinstance(loss_fn, ABSLDLoss):
            raise ValueError(f"loss_fn must be an ABSLDLoss, got {type(loss_fn).__name__}")
        if not hasattr(scheduler, "base_lrs") or not hasattr(scheduler, "optimizer"):
            raise ValueError(f"scheduler must be a torch.optim.lr_scheduler scheduler, got {type(scheduler).__name__}")
        self.loss_fn, self.scheduler = loss_fn, scheduler
        ratio = self._ratio()
        self.beta0 = loss_fn.beta / ratio if ratio > 0 else loss_fn.beta

    def _ratio(self):
        base = float(self.scheduler.base_lrs[0])
        return float(self.scheduler.optimizer.param_groups[0]["lr"]) / base if base > 0 else 1.0

    def step(self):
        """Sets ``loss_fn.beta`` for the coming epoch; call it right after ``scheduler.step()``.

        Returns:
            float: the new beta.
        """
        self.loss_fn.beta = self.beta0 * self._ratio()
        return self.loss_fn.beta
