"""What every method plan says, and the pieces the plans' steps share."""

import contextlib

import torch

from fastabsld.recipe import speed


def untimed(name):
    """The default ``phase`` hook of the steps: no timing.

    Args:
        name: the phase's name.

    Returns:
        context manager: a no-op.
    """
    return contextlib.nullcontext()


def teacher_logits(teacher, x, cfg):
    """The frozen teacher's fp32 logits on ``x`` (no graph).

    Args:
        teacher: the teacher (eval mode).
        x: the inputs.
        cfg: TrainConfig (``amp``).

    Returns:
        Tensor: (B, C) logits.
    """
    with torch.no_grad():
        return speed.forward_fp32(teacher, x, cfg.amp)


def tracked(attack_loss, y, reweight):
    """The attack's loss, counting each step's correct predictions per class when re-weighting (Fair-ARD).

    Args:
        attack_loss: ``loss_fn(logits) -> scalar`` of the attack.
        y: the batch's labels.
        reweight: FairReweight or None.

    Returns:
        callable: ``attack_loss``, wrapped by ``reweight.track`` when ``reweight`` is given.
    """
    return attack_loss if reweight is None else reweight.track(attack_loss, y)


def sample_weight(reweight, y):
    """The per-sample weights of the loss: ``reweight.sample_weight(y)``, or None without re-weighting.

    Args:
        reweight: FairReweight or None.
        y: the batch's labels.

    Returns:
        Tensor or None: (B,) weights.
    """
    return None if reweight is None else reweight.sample_weight(y)


class MethodPlan:
    """One training method of the recipe: its loss state, its per-batch step, its epoch hooks, its checkpoint.

    Attributes:
        name: the method's name (``TrainConfig.method``).
        distills: whether the method distils from a teacher (the loop then requires one).
        folded_attack: whether the attack runs on the student in eval mode, so that the loop may hand the
            step a BatchNorm-folded eval view of it (``fastabsld.recipe.fold``) to attack.
    """

    name = None
    distills = False
    folded_attack = False

    def build_loss(self, cfg, num_classes):
        """The loss module of a run (holding the method's state, saved in checkpoints), or None.

        Args:
            cfg: TrainConfig.
            num_classes: number of classes.

        Returns:
            nn.Module or None.
        """
        raise NotImplementedError

    def step(self, student, teacher, loss_fn, x, y, cfg, generator, *, reweight=None, attack_model=None,
             phase=None):
        """The loss of one batch (attack and loss, not yet back-propagated). Leaves the student in train mode.

        Args:
            student: what the training passes call (the student, or its DDP / compiled wrapper).
            teacher: the frozen teacher (eval mode), or None for a method without one.
            loss_fn: the module from :meth:`build_loss`.
            x, y: the batch, on the device.
            cfg: TrainConfig.
            generator: torch.Generator of the attack's random start.
            reweight: FairReweight (its class weights multiply the loss's rows and it counts the attack's
                robust steps), or None.
            attack_model: what the attack runs on instead of ``student`` (a folded eval view), or None.
            phase: context-manager factory called with each phase's name (timing), or None.

        Returns:
            Tensor: the scalar loss (fp32).
        """
        raise NotImplementedError

    def start_epoch(self, loss_fn, cfg, epoch):
        """Prepares ``loss_fn`` for the 0-based ``epoch`` (before its first batch).

        Args:
            loss_fn: the module from :meth:`build_loss`.
            cfg: TrainConfig.
            epoch: the 0-based epoch.
        """

    def end_epoch(self, loss_fn, cfg, epoch):
        """The once-per-epoch update after the epoch's last batch; returns what the epoch's history entry records.

        Called on every rank (the updates that need the other ranks' statistics all-reduce them).

        Args:
            loss_fn: the module from :meth:`build_loss`.
            cfg: TrainConfig.
            epoch: the 0-based epoch.

        Returns:
            dict: entries of the epoch's history (JSON-friendly; the epoch line shows them).
        """
        return {}

    def checkpoint_entries(self, loss_fn):
        """What ``last.pt`` holds of the method's state.

        Args:
            loss_fn: the module from :meth:`build_loss`.

        Returns:
            dict: ``{"loss_fn": its state_dict (None without a module), "beta": ABSLD's beta or None}``.
        """
        return {"loss_fn": None if loss_fn is None else loss_fn.state_dict(), "beta": None}

    def restore(self, loss_fn, state):
        """Loads the method's state from a ``last.pt`` state (as :meth:`checkpoint_entries` wrote it).

        Args:
            loss_fn: the module from :meth:`build_loss`.
            state: the loaded checkpoint.
        """
        if loss_fn is not None:
            loss_fn.load_state_dict(state["loss_fn"])
