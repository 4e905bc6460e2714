"""The recipe's method plans: each step against the published loss and attack of its method (tests/methods/published.py)
on the same batch and start, no host reads per batch, the registry, the config's checks, and short runs on digits."""

import copy
import math

import pytest
import torch

from fastabsld.recipe import config as config_mod
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.method_plans import PLANS, plan_for, reweight as reweighting
from fastabsld.recipe.models import build_model
from fastabsld.recipe.steps import build_loss, train_step
from fastabsld.recipe.teacher import config_hash, teacher_config
from fastabsld.recipe.train import train
from tests.methods import published
from tests.recipe.conftest import digits_models

CLASSES = 10
# The fused PGD step computes in fp32 whatever the dtype: the fp64 trajectories agree to fp32 rounding, and the
# losses and gradients computed from them to about a thousand fp32 epsilons.
LOSS_TOL = dict(rtol=1e-6, atol=1e-7)
GRAD_TOL = dict(rtol=1e-5, atol=1e-8)


def _batch(batch=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (batch,), generator=gen)
    y[:CLASSES] = torch.arange(CLASSES)
    return x, y


def _cfg(method, **fields):
    return TrainConfig(method=method, steps=4, fold_bn=False, progress=False, **fields)


def _uniform_start(x, cfg, seed):
    """``fastabsld.attack.pgd``'s uniform start (clamped to the box), drawn from the same generator state."""
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype).mul_(2).sub_(1)
    return (x + cfg.eps * noise).clamp(0, 1)


def _normal_noise(x, seed):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)


def _ours(cfg, student, teacher, x, y, *, reweight=None, epoch=0, prepare=None):
    """The plan's loss of one batch (generator seed 5), back-propagated; returns (loss, loss module)."""
    plan = plan_for(cfg.method)
    loss_fn = build_loss(cfg, CLASSES)
    if loss_fn is not None:
        loss_fn = loss_fn.double().train()
        plan.start_epoch(loss_fn, cfg, epoch)
    if prepare:
        prepare(loss_fn)
    loss = plan.step(student, teacher, loss_fn, x, y, cfg, torch.Generator().manual_seed(5), reweight=reweight)
    loss.backward()
    return loss.detach(), loss_fn


def _same_training(student, reference, loss, ref_loss):
    """Same loss, same parameter gradients and same BatchNorm statistics (the attack's train-mode passes count)."""
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), **LOSS_TOL)
    for (name, p), q in zip(student.named_parameters(), reference.parameters()):
        assert p.grad is not None and not torch.equal(p.grad, torch.zeros_like(p.grad)), name
        torch.testing.assert_close(p.grad, q.grad, **GRAD_TOL, msg=name)
    for (name, b), c in zip(student.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, **LOSS_TOL, msg=name)
    assert student.training


def _weights():
    gen = torch.Generator().manual_seed(3)
    return (5 / 6 + (5 / 2 - 5 / 6) * torch.rand(CLASSES, generator=gen, dtype=torch.float64))


def test_trades_step_matches_the_official_trades_loss():
    cfg = _cfg("trades", trades_beta=3.0)
    x, y = _batch()
    student, _ = digits_models(torch.float64)
    reference = copy.deepcopy(student)
    loss, _ = _ours(cfg, student, None, x, y)

    reference.eval()  # the official attack runs in eval mode, from x + 0.001 N(0, 1)
    x_adv = published.trades_attack(reference, x, _normal_noise(x, 5), step_size=cfg.alpha, epsilon=cfg.eps,
                                    perturb_steps=cfg.steps)
    reference.train()
    ref_loss = published.trades_outer_from_logits(reference(x_adv), reference(x), y, 3.0)
    _same_training(student, reference, loss, ref_loss)


@pytest.mark.parametrize("reweight", [False, True], ids=["ard", "fair-ard"])
def test_ard_step_matches_the_official_ard_loss(reweight):
    cfg = _cfg("ard", ard_alpha=0.9, ard_temperature=4.0, reweight=reweight)
    x, y = _batch()
    student, teacher = digits_models(torch.float64)
    reference = copy.deepcopy(student)
    fair = reweighting.build_reweight(cfg, CLASSES)
    if fair is not None:
        fair.double().train().class_weight.copy_(_weights())
    loss, _ = _ours(cfg, student, teacher, x, y, reweight=fair)

    reference.train()  # the official attack runs the student in train mode
    x_adv, kappa = published.ce_attack(reference, x, y, _uniform_start(x, cfg, 5), step_size=cfg.alpha,
                                       epsilon=cfg.eps, num_steps=cfg.steps, count_robust=True)
    outputs, basic = reference(x_adv), reference(x)
    with torch.no_grad():
        teacher_outputs = teacher(x)
    if reweight:
        ref_loss = published.fair_ard_loss(outputs, teacher_outputs, basic, y, _weights(), temp=4.0, alpha=0.9)
        assert fair.robust_steps.tolist() == published.accumulate_kappa([0] * CLASSES, kappa, y)
        assert fair.class_count.tolist() == torch.bincount(y, minlength=CLASSES).tolist()
        assert 0 < sum(kappa) < len(y) * cfg.steps  # some samples fall along the attack, some hold
    else:
        ref_loss = published.ard_loss(outputs, teacher_outputs, basic, y, temp=4.0, alpha=0.9)
    _same_training(student, reference, loss, ref_loss)


@pytest.mark.parametrize("epoch,alpha,reweight", [(0, 0.9, False), (2, 0.9, False), (2, 1.0, True)],
                         ids=["warm-up", "introspective", "fair-iad"])
def test_iad_step_matches_the_official_iad_i_loss(epoch, alpha, reweight):
    # 10 epochs, warm-up 0.2: the introspection starts at epoch 2.
    cfg = _cfg("iad", epochs=10, iad_warmup=0.2, iad_alpha=alpha, iad_temperature=2.0, iad_beta=0.3,
               reweight=reweight)
    x, y = _batch()
    student, teacher = digits_models(torch.float64)
    reference = copy.deepcopy(student)
    fair = reweighting.build_reweight(cfg, CLASSES)
    if fair is not None:
        fair.double().train().class_weight.copy_(_weights())
    loss, loss_fn = _ours(cfg, student, teacher, x, y, reweight=fair, epoch=epoch)
    assert loss_fn.introspective == (epoch >= 2)

    reference.train()
    x_adv, kappa = published.ce_attack(reference, x, y, _uniform_start(x, cfg, 5), step_size=cfg.alpha,
                                       epsilon=cfg.eps, num_steps=cfg.steps, count_robust=True)
    outputs, basic = reference(x_adv), reference(x)
    with torch.no_grad():
        teacher_outputs, guide = teacher(x), teacher(x_adv)
    options = dict(epoch=epoch, begin=2, temp=2.0, alpha=alpha, beta=0.3)
    if reweight:
        ref_loss = published.fair_iad_loss(outputs, teacher_outputs, basic, guide, y, _weights(), **options)
        assert fair.robust_steps.tolist() == published.accumulate_kappa([0] * CLASSES, kappa, y)
    else:
        # One clean forward serves the CE and the introspection's target (the script's second forward, same value).
        ref_loss = published.iad_loss(outputs, teacher_outputs, basic, basic, guide, y, **options)
    _same_training(student, reference, loss, ref_loss)


@pytest.mark.parametrize("method", ["rslad", "absld"])
def test_absld_with_reweighting_matches_the_fair_rslad_loop(method):
    cfg = _cfg(method, reweight=True)
    x, y = _batch()
    student, teacher = digits_models(torch.float64)
    reference = copy.deepcopy(student)
    fair = reweighting.build_reweight(cfg, CLASSES).double().train()
    fair.class_weight.copy_(_weights())
    gen = torch.Generator().manual_seed(11)
    taus = [0.5 + 4.5 * torch.rand(CLASSES, generator=gen, dtype=torch.float64) for _ in range(2)]

    def temper(loss_fn):
        loss_fn.tau_adv.copy_(taus[0])
        loss_fn.tau_nat.copy_(taus[1])

    loss, _ = _ours(cfg, student, teacher, x, y, reweight=fair, prepare=temper)

    with torch.no_grad():
        z_t = teacher(x)
    probs = [torch.softmax(z_t / tau[y].unsqueeze(1), dim=1) for tau in taus]
    reference.eval()  # the Fair-RSLAD attack: eval mode, 0.001 N(0, 1) start, KL to the (tempered) soft labels
    x_adv, kappa = published.rslad_kl_attack(reference, torch.log(probs[0]), x, y, _normal_noise(x, 5),
                                             step_size=cfg.alpha, epsilon=cfg.eps, perturb_steps=cfg.steps)
    reference.train()
    ref_loss = published.fair_rslad_loss(reference(x_adv), reference(x), probs[0], probs[1], y, _weights())
    assert fair.robust_steps.tolist() == published.accumulate_kappa([0] * CLASSES, kappa, y)
    # The script's log(p + 1e-5) moves each element by less than 1e-5 (not the gradient), times its row's weight.
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=1e-5 * _weights().max().item())
    for (name, p), q in zip(student.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **GRAD_TOL, msg=name)


@pytest.mark.parametrize("method,reweight", [("absld", True), ("trades", False), ("ard", True), ("iad", True),
                                             ("pgd-at", False)])
def test_a_step_reads_no_values_on_the_host(method, reweight):
    """On the meta device any .item(), bool(tensor) or value-dependent branch raises: a whole optimisation step
    (attack with counting, the weighted loss, backward, SGD) reads none."""
    cfg = TrainConfig(method=method, reweight=reweight, steps=2, fold_bn=False, progress=False, epochs=10,
                      iad_warmup=0.0)
    student = build_model("cnn-s", CLASSES, 1).to("meta")
    teacher = build_model("cnn-s", CLASSES, 1).to("meta").eval().requires_grad_(False)
    loss_fn = build_loss(cfg, CLASSES)
    loss_fn = None if loss_fn is None else loss_fn.to("meta").train()
    fair = reweighting.build_reweight(cfg, CLASSES)
    fair = None if fair is None else fair.to("meta").train()
    x = torch.empty(8, 1, 8, 8, device="meta")
    y = torch.empty(8, dtype=torch.int64, device="meta")
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    loss = train_step(student, loss_fn, optimizer, x, y, cfg, None, teacher=teacher, reweight=fair)
    assert loss.device.type == "meta"


def test_every_method_has_a_plan():
    assert set(PLANS) == set(config_mod.METHODS)
    assert {name for name, plan in PLANS.items() if plan.distills} == set(config_mod.DISTILLATION_METHODS)
    assert all(plan.name == name for name, plan in PLANS.items())


@pytest.mark.parametrize("fields,match", [
    (dict(method="trades", reweight=True), "reweight re-weights a distillation loss"),
    (dict(method="pgd-at", reweight=True), "method 'pgd-at' distils from no teacher"),
    (dict(reweight=1), "reweight must be bool, got int"),
    (dict(teacher_method="absld"), "teacher_method must be one of"),
    (dict(trades_beta=-1.0), "trades_beta"),
    (dict(ard_temperature=0.0), "ard_temperature"),
    (dict(ard_alpha=1.5), "ard_alpha"),
    (dict(iad_alpha=-0.1), "iad_alpha"),
    (dict(iad_beta=math.inf), "iad_beta"),
    (dict(iad_warmup=2.0), "iad_warmup"),
    (dict(iad_temperature=-2.0), "iad_temperature"),
    (dict(reweight_beta=-1.0), "reweight_beta"),
    (dict(reweight_min=0.0), "reweight_min"),
    (dict(reweight_min=2.0, reweight_max=1.0), "reweight_max"),
    (dict(method="mart"), "method must be one of"),
])
def test_config_rejects_bad_method_settings(fields, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**fields)


def test_published_defaults():
    cfg = TrainConfig()
    assert (cfg.trades_beta, cfg.ard_temperature, cfg.ard_alpha) == (6.0, 30.0, 1.0)
    assert (cfg.iad_temperature, cfg.iad_alpha, cfg.iad_beta, cfg.iad_warmup) == (1.0, 1.0, 0.1, 0.3)
    assert (cfg.reweight, cfg.reweight_beta, cfg.reweight_min, cfg.reweight_max) == (False, 2.0, 5 / 6, 5 / 2)
    assert cfg.teacher_method == "pgd-at"


def test_teacher_cache_key_holds_the_teacher_method_only_with_what_it_reads():
    default = config_hash(teacher_config(TrainConfig()))
    trades = teacher_config(TrainConfig(teacher_method="trades"))
    assert trades.method == "trades" and not trades.reweight
    assert config_hash(trades) != default
    assert config_hash(teacher_config(TrainConfig(teacher_method="trades", trades_beta=1.0))) != config_hash(trades)
    # The student's method settings do not make another PGD-AT teacher (nor does the TRADES beta).
    same = TrainConfig(method="ard", reweight=True, trades_beta=1.0, ard_temperature=4.0, iad_beta=0.5,
                       reweight_beta=1.0)
    assert config_hash(teacher_config(same)) == default


TINY = dict(epochs=2, batch_size=64, steps=2, train_subset=128, progress=False, test_attacks=("clean", "pgd20"),
            val_attacks=("clean",), select_metric="clean.average")


def _teacher():
    torch.manual_seed(123)
    return build_model("cnn-s", CLASSES, 1).eval()


@pytest.mark.parametrize("method,reweight", [("trades", False), ("ard", True), ("iad", True)])
def test_method_trains_on_digits(method, reweight, digits):
    lines = []
    result = train(TrainConfig(method=method, reweight=reweight, iad_warmup=0.5, **TINY), None, teacher=_teacher(),
                   data=digits, log=lines.append)
    history = result["history"]
    assert len(history) == 2 and all(math.isfinite(e["train_loss"]) and e["train_loss"] > 0 for e in history)
    assert set(result["test"]) == {"clean", "pgd20"}
    if reweight:
        weights = torch.tensor(history[-1]["class_weight"])
        assert not torch.allclose(weights, torch.ones(CLASSES))
        assert torch.all((weights >= 5 / 6 - 1e-6) & (weights <= 5 / 2 + 1e-6))
        assert all("class_weight" in line for line in lines if " epoch " in line)
    if method == "iad":
        assert [e["introspective"] for e in history] == [False, True]
        assert "introspective" in [line for line in lines if " epoch 2/2" in line][0]
