"""Fair-ARD's per-class re-weighting for any distillation plan (``TrainConfig.reweight``).

The state is a :class:`fastabsld.methods.FairReweight` on the device: the plans' steps wrap their attack's
loss with ``track`` (counting, per class, the attack steps at which each sample is still classified
correctly) and pass ``sample_weight(y)`` to their loss; once per epoch :func:`end_epoch` turns the epoch's
counts into the next epoch's class weights (all-reduced over the ranks under torchrun, like ABSLD's risks).
It is saved in ``last.pt`` under ``"reweight"``.
"""

from fastabsld.methods.fair import FairReweight


def build_reweight(cfg, num_classes):
    """The run's FairReweight, or None without ``cfg.reweight``.

    Args:
        cfg: TrainConfig.
        num_classes: number of classes.

    Returns:
        FairReweight or None.
    """
    if not cfg.reweight:
        return None
    return FairReweight(num_classes, beta=cfg.reweight_beta, weight_min=cfg.reweight_min,
                        weight_max=cfg.reweight_max)


def end_epoch(reweight):
    """The once-per-epoch class weight update; returns what the epoch's history entry records.

    Args:
        reweight: FairReweight or None.

    Returns:
        dict: ``{"class_weight": the weights the next epoch uses}``, or {} without re-weighting.
    """
    if reweight is None:
        return {}
    reweight.update_weights()
    return {"class_weight": reweight.class_weight.tolist()}


def checkpoint_entries(reweight):
    """What ``last.pt`` holds of the re-weighting.

    Args:
        reweight: FairReweight or None.

    Returns:
        dict: ``{"reweight": its state_dict or None}``.
    """
    return {"reweight": None if reweight is None else reweight.state_dict()}


def restore(reweight, state):
    """Loads the re-weighting from a ``last.pt`` state (one saved without it leaves the weights at 1).

    Args:
        reweight: FairReweight or None.
        state: the loaded checkpoint.
    """
    if reweight is not None and state.get("reweight") is not None:
        reweight.load_state_dict(state["reweight"])
