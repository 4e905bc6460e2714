"""The training steps against the released loop, and with the speed options (amp, channels_last, compile)."""

import copy

import pytest
import torch

from fastabsld.recipe import speed
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.loop import train_epoch
from fastabsld.recipe.steps import build_loss
from tests.recipe.conftest import digits_models
from tests.released import released_step

NUM_CLASSES = 10


def _batches(count, batch, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 1, 8, 8, generator=gen, dtype=dtype),
             torch.randint(0, NUM_CLASSES, (batch,), generator=gen)) for _ in range(count)]


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)


def _fast_run(student, teacher, batches, cfg, taus, *, channels_last=False):
    """Two fastabsld steps through train_epoch; returns (mean loss, student, loss module)."""
    loss_fn = build_loss(cfg, NUM_CLASSES).to(batches[0][0].dtype)
    loss_fn.tau_adv.copy_(taus[0])
    loss_fn.tau_nat.copy_(taus[1])
    if channels_last:
        student, teacher = student.to(memory_format=torch.channels_last), teacher.to(memory_format=torch.channels_last)
    step_student, view, teacher = speed.step_models(student, cfg, teacher=teacher)
    gen = torch.Generator().manual_seed(7)
    mean = train_epoch(step_student, loss_fn, _sgd(student), batches, cfg, gen, teacher=teacher, attack_model=view)
    return mean, student, loss_fn


def _taus(dtype):
    gen = torch.Generator().manual_seed(11)
    return (0.5 + 4.5 * torch.rand(NUM_CLASSES, generator=gen)).to(dtype), \
        (0.5 + 4.5 * torch.rand(NUM_CLASSES, generator=gen)).to(dtype)


@pytest.mark.parametrize("fold_bn", [True, False])
def test_two_steps_match_the_released_loop(fold_bn):
    """Same init, batches, noise and temperatures (released aliasing): same losses, weights and class risks."""
    dtype = torch.float64
    batches = _batches(2, 48, dtype)
    student, teacher = digits_models(dtype)
    reference = copy.deepcopy(student)
    taus = _taus(dtype)
    cfg = TrainConfig(temperature_mode="released", fold_bn=fold_bn, progress=False)
    mean, student, loss_fn = _fast_run(student, teacher, batches, cfg, taus)

    state = {"tau_adv": taus[0].clone(), "tau_nat": taus[1].clone(),
             "risk_adv": torch.zeros(NUM_CLASSES, dtype=dtype), "risk_nat": torch.zeros(NUM_CLASSES, dtype=dtype)}
    optimizer, gen = _sgd(reference), torch.Generator().manual_seed(7)
    losses = [released_step(reference, teacher, optimizer, x, y, state, eps=cfg.eps, alpha=cfg.alpha,
                            steps=cfg.steps, generator=gen) for x, y in batches]
    # The released KL carries log(p + 1e-5) instead of log p: values differ by < 1e-5, gradients not at all.
    torch.testing.assert_close(mean.double(), torch.stack(losses).mean(), atol=2e-5, rtol=0)
    for (name, ours), theirs in zip(student.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=1e-6, msg=name)
    torch.testing.assert_close(loss_fn.risk_adv, state["risk_adv"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss_fn.risk_nat, state["risk_nat"], atol=1e-6, rtol=1e-6)


def test_channels_last_matches_contiguous():
    batches = _batches(1, 32, torch.float32)
    taus = _taus(torch.float32)
    cfg = TrainConfig(progress=False)
    runs = []
    for channels_last in (False, True):
        student, teacher = digits_models(torch.float32)
        runs.append(_fast_run(student, teacher, batches, cfg, taus, channels_last=channels_last))
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-5, rtol=1e-5)
    assert runs[1][1].features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(runs[0][1].parameters(), runs[1][1].parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_amp_bf16_step_on_cpu_is_close_to_fp32():
    batches = _batches(1, 32, torch.float32)
    taus = _taus(torch.float32)
    losses = []
    for amp in (False, True):
        student, teacher = digits_models(torch.float32)
        losses.append(_fast_run(student, teacher, batches, TrainConfig(amp=amp, progress=False), taus)[0])
    assert losses[1].dtype == torch.float32 and torch.isfinite(losses[1])
    # bf16 keeps 8 bits of mantissa: the loss agrees to about 1e-2 relative (the attack may move a few pixels).
    torch.testing.assert_close(losses[1], losses[0], rtol=5e-2, atol=1e-3)


def test_compiled_step_runs_and_matches_eager():
    """--compile: one tiny step through torch.compile (inductor) gives the eager step's loss."""
    batches = _batches(1, 16, torch.float32)
    taus = _taus(torch.float32)
    losses = []
    for compile_ in (False, True):
        student, teacher = digits_models(torch.float32)
        cfg = TrainConfig(compile=compile_, steps=2, progress=False)
        losses.append(_fast_run(student, teacher, batches, cfg, taus)[0])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
