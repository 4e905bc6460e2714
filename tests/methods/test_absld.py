"""ABSLDLoss against the released formulation (values, gradients, temperatures, risks)."""

import io
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

import fastabsld.loss
from fastabsld.methods.absld import ABSLDLoss
from tests.methods.helpers import run_processes
from tests.released import (
    released_absld_loss,
    released_soft_labels,
    released_temperature_update,
)

MODES = {"paper": False, "released": True}


def random_case(batch, classes, seed=0, dtype=torch.float64, all_classes=False):
    gen = torch.Generator().manual_seed(seed)
    adv, nat, teacher = (4 * torch.randn(batch, classes, generator=gen, dtype=dtype) for _ in range(3))
    labels = torch.randint(0, classes, (batch,), generator=gen)
    if all_classes:
        labels[:classes] = torch.arange(classes)
    return adv, nat, teacher, labels


def randomise_temperatures(loss_fn, seed=1):
    gen = torch.Generator().manual_seed(seed)
    classes = loss_fn.num_classes
    loss_fn.tau_adv.copy_(0.5 + 4.5 * torch.rand(classes, generator=gen))
    loss_fn.tau_nat.copy_(0.5 + 4.5 * torch.rand(classes, generator=gen))


def test_reexported_from_loss():
    assert fastabsld.loss.ABSLDLoss is ABSLDLoss


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("batch,classes", [(1, 1), (7, 3), (16, 10), (5, 100)])
def test_value_and_gradients_match_released(mode, batch, classes):
    loss_fn = ABSLDLoss(classes, temperature_mode=mode).double()  # fp64 temperatures: a tight oracle
    randomise_temperatures(loss_fn)
    adv, nat, teacher, labels = random_case(batch, classes)
    ours_in = [t.clone().requires_grad_() for t in (adv, nat)]
    ref_in = [t.clone().requires_grad_() for t in (adv, nat)]
    ours = loss_fn(*ours_in, teacher, labels)
    ref = released_absld_loss(*ref_in, teacher, labels, loss_fn.tau_adv, loss_fn.tau_nat, aliased=MODES[mode])
    # The exact KL differs from the released one only by sum p*log(1 + 1e-5/p) / (B*C) in (0, 1e-5].
    assert 0 <= (ref - ours).item() <= 1e-5
    ours.backward()
    ref.backward()
    for mine, theirs in zip(ours_in, ref_in):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", list(MODES))
def test_fp32_gradients_and_custom_weights(mode):
    loss_fn = ABSLDLoss(10, adv_weight=0.3, nat_weight=2.0, temperature_mode=mode)
    randomise_temperatures(loss_fn, seed=4)
    adv, nat, teacher, labels = random_case(64, 10, seed=5, dtype=torch.float32)
    ours_in = [t.clone().requires_grad_() for t in (adv, nat)]
    ref_in = [t.clone().requires_grad_() for t in (adv, nat)]
    ours = loss_fn(*ours_in, teacher, labels)
    ref = released_absld_loss(*ref_in, teacher, labels, loss_fn.tau_adv, loss_fn.tau_nat, aliased=MODES[mode],
                              adv_weight=0.3, nat_weight=2.0)
    assert ours.dtype == torch.float32
    assert abs((ref - ours).item()) <= 2.3e-5 + 1e-6
    ours.backward()
    ref.backward()
    for mine, theirs in zip(ours_in, ref_in):
        torch.testing.assert_close(mine.grad, theirs.grad)


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none"])
def test_reductions_against_rowwise_kl(reduction):
    """Each reduction of the exact row KL: ``mean`` / (B * C), ``batchmean`` / B, ``sum``, ``none`` per row."""
    batch, classes = 9, 7
    loss_fn = ABSLDLoss(classes, adv_weight=0.7, nat_weight=0.4, reduction=reduction).double()
    randomise_temperatures(loss_fn, seed=2)
    adv, nat, teacher, labels = random_case(batch, classes, seed=3)
    ours_in = [t.clone().requires_grad_() for t in (adv, nat)]
    ref_in = [t.clone().requires_grad_() for t in (adv, nat)]

    def rows(student, tau):
        p = torch.softmax(teacher / tau[labels].unsqueeze(1), dim=1)
        return (p * (torch.log(p) - torch.log_softmax(student, dim=1))).sum(dim=1)

    per_row = 0.7 * rows(ref_in[0], loss_fn.tau_adv) + 0.4 * rows(ref_in[1], loss_fn.tau_nat)
    ref = {"mean": per_row.sum() / (batch * classes), "batchmean": per_row.sum() / batch, "sum": per_row.sum(),
           "none": per_row}[reduction]
    ours = loss_fn(*ours_in, teacher, labels)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    weights = torch.rand(ref.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    for mine, theirs in zip(ours_in, ref_in):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)


def test_batchmean_is_num_classes_times_the_released_mean():
    adv, nat, teacher, labels = random_case(6, 10, seed=8)
    mean = ABSLDLoss(10).double()(adv, nat, teacher, labels)
    batchmean = ABSLDLoss(10, reduction="batchmean").double()(adv, nat, teacher, labels)
    torch.testing.assert_close(batchmean, 10 * mean, rtol=1e-12, atol=0)


def test_beta_decay_follows_the_released_milestones():
    from fastabsld.methods.absld import BetaDecay
    from fastabsld.recipe.config import TrainConfig
    from fastabsld.recipe.schedule import beta_at, milestone_epochs

    cfg = TrainConfig(epochs=40, beta=0.3)
    loss_fn = ABSLDLoss(10, beta=cfg.beta)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestone_epochs(cfg), cfg.lr_gamma)
    decay = BetaDecay(loss_fn, scheduler)
    for epoch in range(cfg.epochs):
        assert loss_fn.beta == pytest.approx(beta_at(cfg, epoch), rel=1e-12), epoch  # the recipe's schedule
        optimizer.step()
        scheduler.step()
        decay.step()
        if epoch == 31:  # built again mid-run (after a resume): continues from the current ratio
            decay = BetaDecay(loss_fn, scheduler)
    with pytest.raises(ValueError, match="loss_fn"):
        BetaDecay(torch.nn.KLDivLoss(), scheduler)


def test_modes_differ_and_match_their_soft_labels():
    adv, nat, teacher, labels = random_case(12, 5, seed=2)
    paper, released = ABSLDLoss(5), ABSLDLoss(5, temperature_mode="released")
    released.load_state_dict(paper.state_dict())
    randomise_temperatures(paper, seed=3)
    randomise_temperatures(released, seed=3)
    for mode, loss_fn in (("paper", paper), ("released", released)):
        p_adv, p_nat = released_soft_labels(teacher, labels, loss_fn.tau_adv.double(), loss_fn.tau_nat.double(),
                                            aliased=MODES[mode])
        torch.testing.assert_close(loss_fn.teacher_probs(teacher, labels, branch="adv"), p_adv)
        torch.testing.assert_close(loss_fn.teacher_probs(teacher, labels, branch="nat"), p_nat)
    assert not torch.allclose(paper.teacher_probs(teacher, labels), released.teacher_probs(teacher, labels))
    assert not torch.allclose(paper(adv, nat, teacher, labels), released(adv, nat, teacher, labels))


def test_teacher_probs_fp32_rows_sum_to_one():
    loss_fn = ABSLDLoss(4)
    randomise_temperatures(loss_fn)
    _, _, teacher, labels = random_case(6, 4, dtype=torch.bfloat16)
    probs = loss_fn.teacher_probs(teacher, labels, branch="nat")
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(6))
    expected = torch.softmax(teacher.float() / loss_fn.tau_nat[labels, None], dim=1)
    torch.testing.assert_close(probs, expected)


def per_sample_risks(batches, classes):
    """Per-class sums of each sample's CE, one sample at a time in Python."""
    risk_adv, risk_nat = [0.0] * classes, [0.0] * classes
    for adv, nat, _, labels in batches:
        for i, label in enumerate(labels.tolist()):
            risk_adv[label] += F.cross_entropy(adv[i:i + 1], labels[i:i + 1]).item()
            risk_nat[label] += F.cross_entropy(nat[i:i + 1], labels[i:i + 1]).item()
    return torch.tensor(risk_adv), torch.tensor(risk_nat)


def test_risk_accumulation_against_per_sample_loop():
    classes = 6
    batches = [random_case(size, classes, seed=seed, dtype=torch.float32) for seed, size in enumerate((5, 1, 9))]
    batches[1][3].fill_(2)
    loss_fn = ABSLDLoss(classes)
    for adv, nat, teacher, labels in batches:
        loss_fn(adv.requires_grad_(), nat.requires_grad_(), teacher, labels).backward()
    expected_adv, expected_nat = per_sample_risks(batches, classes)
    torch.testing.assert_close(loss_fn.risk_adv, expected_adv)
    torch.testing.assert_close(loss_fn.risk_nat, expected_nat)
    assert not loss_fn.risk_adv.requires_grad


def test_eval_mode_does_not_accumulate():
    loss_fn = ABSLDLoss(3).eval()
    adv, nat, teacher, labels = random_case(8, 3)
    eval_loss = loss_fn(adv, nat, teacher, labels)
    assert torch.equal(loss_fn.risk_adv, torch.zeros(3)) and torch.equal(loss_fn.risk_nat, torch.zeros(3))
    train_loss = loss_fn.train()(adv, nat, teacher, labels)
    assert torch.equal(eval_loss, train_loss)
    assert (loss_fn.risk_adv > 0).any()


def test_update_temperatures_over_epochs_matches_released():
    classes = 5
    loss_fn = ABSLDLoss(classes, beta=0.2)
    tau_adv, tau_nat = torch.ones(classes), torch.ones(classes)
    for epoch in range(4):
        batches = [random_case(10, classes, seed=10 * epoch + i, dtype=torch.float32) for i in range(2)]
        for adv, nat, teacher, labels in batches:
            loss_fn(adv, nat, teacher, labels)
        risk_adv, risk_nat = per_sample_risks(batches, classes)
        if epoch == 2:
            loss_fn.beta *= 0.1
        beta = 0.2 * (0.1 if epoch >= 2 else 1.0)
        tau_adv = released_temperature_update(tau_adv, risk_adv, beta)
        tau_nat = released_temperature_update(tau_nat, risk_nat, beta)
        loss_fn.update_temperatures()
        torch.testing.assert_close(loss_fn.tau_adv, tau_adv)
        torch.testing.assert_close(loss_fn.tau_nat, tau_nat)
        assert torch.equal(loss_fn.risk_adv, torch.zeros(classes))
        assert torch.equal(loss_fn.risk_nat, torch.zeros(classes))
    assert not torch.allclose(loss_fn.tau_adv, loss_fn.tau_nat)


def test_update_without_risk_keeps_temperatures():
    loss_fn = ABSLDLoss(4)
    randomise_temperatures(loss_fn)
    before = loss_fn.tau_adv.clone(), loss_fn.tau_nat.clone()
    loss_fn.update_temperatures()
    assert torch.equal(loss_fn.tau_adv, before[0]) and torch.equal(loss_fn.tau_nat, before[1])


def test_forward_and_update_trace_without_host_sync():
    # fullgraph tracing fails on .item(), bool(tensor) and data-dependent Python branches.
    eager, traced = ABSLDLoss(5, temperature_mode="released"), ABSLDLoss(5, temperature_mode="released")
    compiled = torch.compile(traced, backend="eager", fullgraph=True)
    for seed in range(2):
        batch = random_case(8, 5, seed=seed, dtype=torch.float32)
        torch.testing.assert_close(compiled(*batch), eager(*batch))
    torch.testing.assert_close(traced.risk_adv, eager.risk_adv)
    torch.compile(traced.update_temperatures, backend="eager", fullgraph=True)()
    eager.update_temperatures()
    torch.testing.assert_close(traced.tau_adv, eager.tau_adv)
    assert not torch.equal(traced.tau_adv, torch.ones(5))


@pytest.mark.cuda
def test_no_sync_on_cuda():
    loss_fn = ABSLDLoss(10).cuda()
    adv, nat, teacher, labels = (t.cuda() for t in random_case(32, 10, dtype=torch.float32))
    adv.requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_fn(adv, nat, teacher, labels).backward()
        loss_fn.teacher_probs(teacher, labels)
        loss_fn.update_temperatures()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_state_dict_round_trip():
    loss_fn = ABSLDLoss(4, temperature_mode="released", tau_init=2.0)
    for seed in range(2):
        loss_fn(*random_case(6, 4, seed=seed))
        loss_fn.update_temperatures()
    loss_fn(*random_case(6, 4, seed=7))
    loss_fn.beta *= 0.1
    buffer = io.BytesIO()
    torch.save(loss_fn.state_dict(), buffer)
    buffer.seek(0)
    restored = ABSLDLoss(4, temperature_mode="released", tau_init=2.0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for name in ("tau_adv", "tau_nat", "risk_adv", "risk_nat"):
        assert torch.equal(getattr(restored, name), getattr(loss_fn, name)), name
    assert (restored.tau_adv != 2.0).any() and (restored.risk_adv > 0).any()
    assert restored.beta == loss_fn.beta == pytest.approx(0.01)
    restored.update_temperatures()
    loss_fn.update_temperatures()
    assert torch.equal(restored.tau_adv, loss_fn.tau_adv)


def test_buffers_follow_module_to_dtype():
    loss_fn = ABSLDLoss(3).double()
    assert loss_fn.tau_adv.dtype == torch.float64
    loss = loss_fn(*random_case(4, 3))
    assert loss.dtype == torch.float64 and loss_fn.risk_adv.dtype == torch.float64


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to(dtype=torch.bfloat16)])
def test_temperatures_and_risks_stay_fp32_under_a_16_bit_module(cast):
    loss_fn = cast(ABSLDLoss(3))
    for name in ("tau_adv", "tau_nat", "risk_adv", "risk_nat"):
        assert getattr(loss_fn, name).dtype == torch.float32, name


def test_a_bf16_module_gives_the_fp32_temperatures_over_200_batches():
    """The risk sums of an epoch reach thousands: bf16 (8 mantissa bits) stops adding 0.5-sized losses there."""
    classes, batches = 10, 200
    wide, narrow = ABSLDLoss(classes), ABSLDLoss(classes).to(torch.bfloat16)
    expected = torch.zeros(2, classes, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    for _ in range(batches):
        adv, nat, teacher = (2 * torch.randn(64, classes, generator=gen) for _ in range(3))
        labels = torch.randint(0, classes, (64,), generator=gen)
        # The risks differ per class: class k's logits are pushed away from k more, the larger k.
        adv[torch.arange(64), labels] -= labels.to(adv.dtype) / classes
        for module in (wide, narrow):
            module(adv.to(torch.bfloat16), nat.to(torch.bfloat16), teacher.to(torch.bfloat16), labels)
        for row, logits in enumerate((adv, nat)):
            losses = F.cross_entropy(logits.to(torch.bfloat16).double(), labels, reduction="none")
            expected[row].index_add_(0, labels, losses)
    assert expected.min() > 1000  # far past where a bf16 sum of such losses saturates (256 * 0.5 .. 4)
    tol = dict(rtol=1e-4, atol=0.0)  # fp32 sums of 1300 terms: relative error well below 1e-4
    torch.testing.assert_close(narrow.risk_adv.double(), expected[0], **tol)
    torch.testing.assert_close(narrow.risk_nat.double(), expected[1], **tol)
    wide.update_temperatures()
    narrow.update_temperatures()
    assert narrow.tau_adv.dtype == torch.float32
    torch.testing.assert_close(narrow.tau_adv, wide.tau_adv)
    torch.testing.assert_close(narrow.tau_nat, wide.tau_nat)
    reference = released_temperature_update(torch.ones(classes, dtype=torch.float64), expected[0], 0.1)
    torch.testing.assert_close(narrow.tau_adv.double(), reference, rtol=1e-5, atol=1e-6)
    assert narrow.tau_adv.argmin() == classes - 1  # the riskiest class gets the lowest temperature


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=2.0), "num_classes"),
    (dict(num_classes=3, tau_min=0.0, tau_init=1.0), "tau_min"),
    (dict(num_classes=3, tau_init=6.0), "tau_init"),
    (dict(num_classes=3, tau_min=2.0, tau_max=1.0, tau_init=1.5), "tau_min"),
    (dict(num_classes=3, adv_weight=float("inf")), "adv_weight"),
    (dict(num_classes=3, nat_weight=float("nan")), "nat_weight"),
    (dict(num_classes=3, adv_weight=-1.0), "adv_weight"),
    (dict(num_classes=3, nat_weight=-0.5), "nat_weight"),
    (dict(num_classes=3, beta=-1.0), "beta"),
    (dict(num_classes=3, temperature_mode="aliased"), "temperature_mode"),
    (dict(num_classes=3, reduction="batch"), "reduction"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ABSLDLoss(**kwargs)


@pytest.mark.parametrize("state", [{}, None, {"tau": 1.0}])
def test_malformed_extra_state_is_a_clear_error(state):
    with pytest.raises(ValueError, match="extra state must be a dict with key 'beta'"):
        ABSLDLoss(3).set_extra_state(state)


def test_input_errors():
    loss_fn = ABSLDLoss(3)
    adv, nat, teacher, labels = random_case(4, 3)
    with pytest.raises(ValueError, match="nat_logits"):
        loss_fn(adv, nat[:, :2], teacher, labels)
    with pytest.raises(ValueError, match="adv_logits"):
        loss_fn(adv[:3], nat, teacher, labels)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(adv, nat, teacher, labels.float())
    with pytest.raises(ValueError, match="labels"):
        loss_fn(adv, nat, teacher, labels[:, None])
    with pytest.raises(ValueError, match="teacher_logits"):
        loss_fn.teacher_probs(teacher[:, :1], labels)
    with pytest.raises(ValueError, match="branch"):
        loss_fn.teacher_probs(teacher, labels, branch="clean")
    for bad in (-1, 3):  # a negative label must not wrap around to the last class's temperature
        with pytest.raises(ValueError, match="labels"):
            loss_fn.teacher_probs(teacher, torch.tensor([0, 1, bad, 2]))
    for bad in (-100, 3):
        with pytest.raises(ValueError, match="labels"):
            loss_fn.eval()(adv, nat, teacher, torch.tensor([0, 1, bad, 2]))


# Two processes with the gloo backend: each rank sees different data, the temperatures must agree.

WORLD = 2
CLASSES = 5
EPOCHS = 3


def rank_batches(rank, epoch):
    """The batches one rank sees in one epoch (rank 1 never sees class 4 in epoch 0)."""
    batches = [random_case(6 + 3 * rank, CLASSES, seed=100 * rank + 10 * epoch + i, dtype=torch.float32)
               for i in range(2)]
    if rank == 1 and epoch == 0:
        for batch in batches:
            batch[3].remainder_(4)
    return batches


def ddp_worker(rank, port, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        loss_fn = ABSLDLoss(CLASSES, temperature_mode="released")
        history = []
        for epoch in range(EPOCHS):
            for batch in rank_batches(rank, epoch):
                loss_fn(*batch)
            loss_fn.update_temperatures()
            history.append((loss_fn.tau_adv.clone(), loss_fn.tau_nat.clone()))
        torch.save(history, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_temperatures_agree(tmp_path):
    assert run_processes(ddp_worker, WORLD, str(tmp_path)) == [0] * WORLD

    histories = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    single = ABSLDLoss(CLASSES, temperature_mode="released")
    tau_adv, tau_nat = torch.ones(CLASSES), torch.ones(CLASSES)
    for epoch in range(EPOCHS):
        for rank in range(WORLD):
            for batch in rank_batches(rank, epoch):
                single(*batch)
        summed = [per_sample_risks(rank_batches(rank, epoch), CLASSES) for rank in range(WORLD)]
        tau_adv = released_temperature_update(tau_adv, summed[0][0] + summed[1][0], single.beta)
        tau_nat = released_temperature_update(tau_nat, summed[0][1] + summed[1][1], single.beta)
        single.update_temperatures()
        for name, got0, got1, mine, oracle in zip(("tau_adv", "tau_nat"), histories[0][epoch], histories[1][epoch],
                                                  (single.tau_adv, single.tau_nat), (tau_adv, tau_nat)):
            assert torch.equal(got0, got1), (epoch, name)
            torch.testing.assert_close(got0, mine, rtol=0, atol=1e-6)
            torch.testing.assert_close(got0, oracle, rtol=0, atol=1e-5)
    assert not torch.equal(histories[0][-1][0], torch.ones(CLASSES))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
