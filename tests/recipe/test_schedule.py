"""The learning-rate and beta schedule scaled from the released 300-epoch recipe."""

import pytest
import torch

from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.schedule import beta_at, milestone_epochs


def test_milestones_mirror_released_schedule():
    cfg = TrainConfig(epochs=300)
    assert milestone_epochs(cfg) == [215, 260, 285]
    assert beta_at(cfg, 214) == pytest.approx(0.1) and beta_at(cfg, 215) == pytest.approx(0.01)
    assert beta_at(cfg, 299) == pytest.approx(1e-4)
    # beta follows the LR of torch's MultiStepLR epoch by epoch.
    cfg = TrainConfig(epochs=20)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestone_epochs(cfg), cfg.lr_gamma)
    for epoch in range(cfg.epochs):
        assert opt.param_groups[0]["lr"] / cfg.lr == pytest.approx(beta_at(cfg, epoch) / cfg.beta)
        opt.step()
        sched.step()
