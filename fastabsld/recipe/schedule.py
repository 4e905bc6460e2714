"""The learning-rate and ABSLD beta schedule of the released recipe, scaled to any number of epochs."""


def milestone_epochs(cfg):
    """The LR milestones in epochs: ``int(fraction * epochs)``, at least 1, deduplicated.

    Args:
        cfg: TrainConfig.

    Returns:
        list of int: sorted milestone epochs.
    """
    return sorted({max(1, int(f * cfg.epochs)) for f in cfg.milestones})


def beta_at(cfg, epoch):
    """The ABSLD ``beta`` during 0-based ``epoch``: scaled by ``lr_gamma`` at every passed milestone.

    Args:
        cfg: TrainConfig.
        epoch: 0-based epoch.

    Returns:
        float: beta (0 for ``rslad`` and ``pgd-at``, whose temperatures stay at 1).
    """
    if cfg.method != "absld":
        return 0.0
    return cfg.beta * cfg.lr_gamma ** sum(m <= epoch for m in milestone_epochs(cfg))
