"""FairReweight against the Fair-ARD scripts' per-sample loops: robust-step counting, the class weight update,
the weighted losses of fair-rslad and ABSLD + re-weighting, device state, state_dict, ranks, host syncs."""

import io
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

import fastabsld
from fastabsld.attack import kl_loss, pgd, pgd_loop
from fastabsld.methods import ABSLDLoss, ARDLoss, FairReweight, IADLoss, TRADESLoss, ard_attack_loss
from tests.methods import published
from tests.methods.helpers import run_processes, STEP_ATOL, images, leaves, logits_case, small_model, tolerance
from tests.released import released_soft_labels

CLASSES = 3
EPS, ALPHA, STEPS = 0.1, 0.02, 10


def balanced_epoch(seed, batches=2, batch=12):
    """Batches whose labels hold every class equally often over the epoch (the scripts' len(dataset) / C)."""
    out = []
    for i in range(batches):
        x = images(batch, seed=seed * 10 + i)
        labels = torch.arange(batch) % CLASSES
        labels = labels[torch.randperm(batch, generator=torch.Generator().manual_seed(seed + i))]
        out.append((x, labels))
    return out


def uniform_start(x, seed):
    """The ARD-family scripts' start ``x + U(-eps, eps)``, not clamped."""
    return x + EPS * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype) - 1)


def test_counting_and_weights_match_fair_ard_over_epochs():
    model = small_model(18, CLASSES, seed=2)
    reweight = FairReweight(CLASSES, beta=2.0).double()
    for epoch in range(2):
        kappa_total = [0] * CLASSES
        for i, (x, labels) in enumerate(balanced_epoch(epoch)):
            start = uniform_start(x, 100 * epoch + i)
            ours = pgd_loop(model, x, start, reweight.track(ard_attack_loss(labels), labels), eps=EPS, alpha=ALPHA,
                            steps=STEPS)
            ref, kappa = published.ce_attack(model, x, labels, start, step_size=ALPHA, epsilon=EPS, num_steps=STEPS,
                                             count_robust=True)
            torch.testing.assert_close(ours, ref, rtol=0, atol=STEP_ATOL)
            published.accumulate_kappa(kappa_total, kappa, labels)
        assert reweight.robust_steps.tolist() == kappa_total
        assert reweight.class_count.tolist() == [8] * CLASSES
        assert 0 < sum(kappa_total) < 24 * STEPS  # some samples fall along the attack, some hold
        expected = published.weight_assign(kappa_total, 24 / CLASSES, CLASSES, 2.0)
        reweight.update_weights()
        torch.testing.assert_close(reweight.class_weight, expected, **tolerance(torch.float64))
        assert not reweight.robust_steps.any() and not reweight.class_count.any()
    assert not torch.equal(reweight.class_weight, torch.ones(CLASSES, dtype=torch.float64))


def test_fair_rslad_attack_counts_and_loss_match_the_script():
    classes = 4
    model = small_model(18, classes, seed=5).eval()
    x = images(16, seed=6)
    labels = torch.arange(16) % classes
    (teacher_logits,), _ = logits_case(16, classes, seed=7, count=1)
    reweight = FairReweight(classes).double()
    target = F.softmax(teacher_logits, dim=1)
    ours = pgd(model, x, reweight.track(kl_loss(target), labels), eps=8 / 255, alpha=2 / 255, steps=STEPS,
               random_start="normal", generator=torch.Generator().manual_seed(3))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    ref, kappa = published.rslad_kl_attack(model, teacher_logits, x, labels, noise, step_size=2 / 255, epsilon=8 / 255,
                                           perturb_steps=STEPS)
    torch.testing.assert_close(ours, ref, rtol=0, atol=STEP_ATOL)
    assert reweight.robust_steps.tolist() == published.accumulate_kappa([0] * classes, kappa, labels)

    reweight.class_weight.copy_(torch.tensor([5 / 6, 2.5, 1.2, 1.0], dtype=torch.float64))
    model.train()
    adv_logits, nat_logits = leaves(model(ours), model(x))
    ref_in = leaves(adv_logits, nat_logits)
    rslad = ABSLDLoss(classes, beta=0.0).double()
    mine = rslad(adv_logits, nat_logits, teacher_logits, labels, sample_weight=reweight.sample_weight(labels))
    theirs = published.fair_rslad_loss(*ref_in, target, target, labels, reweight.class_weight)
    # The script's log(p + 1e-5) adds sum w p log(1 + 1e-5/p) / (B C) in (0, max(w) 1e-5] to the value only.
    assert 0 <= (theirs - mine).item() <= 2.5e-5
    mine.backward()
    theirs.backward()
    for a, b in zip((adv_logits, nat_logits), ref_in):
        torch.testing.assert_close(a.grad, b.grad, **tolerance(torch.float64))


@pytest.mark.parametrize("mode", ["paper", "released"])
def test_absld_with_reweighting_weights_both_tempered_terms(mode):
    classes = 5
    (adv, nat, teacher), labels = logits_case(20, classes, seed=8)
    loss_fn = ABSLDLoss(classes, temperature_mode=mode).double()
    gen = torch.Generator().manual_seed(9)
    loss_fn.tau_adv.copy_(0.5 + 4.5 * torch.rand(classes, generator=gen))
    loss_fn.tau_nat.copy_(0.5 + 4.5 * torch.rand(classes, generator=gen))
    weight_of_class = torch.linspace(5 / 6, 5 / 2, classes, dtype=torch.float64)
    ours_in, ref_in = leaves(adv, nat), leaves(adv, nat)
    ours = loss_fn(*ours_in, teacher, labels, sample_weight=weight_of_class[labels])
    p_adv, p_nat = released_soft_labels(teacher, labels, loss_fn.tau_adv, loss_fn.tau_nat, aliased=mode == "released")
    ref = published.fair_rslad_loss(*ref_in, p_adv, p_nat, labels, weight_of_class)
    assert 0 <= (ref - ours).item() <= 2.5e-5
    ours.backward()
    ref.backward()
    for mine, theirs in zip(ours_in, ref_in):
        torch.testing.assert_close(mine.grad, theirs.grad, **tolerance(torch.float64))
    plain = ABSLDLoss(classes, temperature_mode=mode).double()
    plain.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(plain(adv, nat, teacher, labels),
                               loss_fn(adv, nat, teacher, labels, sample_weight=torch.ones(20, dtype=torch.float64)),
                               **tolerance(torch.float64))


def test_weights_divide_by_each_class_count_on_imbalanced_data():
    reweight = FairReweight(4, beta=2.0).double()
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 9 + [3] * 3)
    reweight.record_batch(labels)
    for step in range(4):  # class 0 robust at all 4 steps; 1 and 3 at step 0 only; 5 of the 9 of class 2 at all
        predicted = labels.clone()
        predicted[((labels == 1) | (labels == 3)) & (step > 0)] = 0
        predicted[(labels == 2) & (torch.arange(19) % 2 == 0)] = 1
        reweight.record_step(F.one_hot(predicted, 4).double(), labels)
    kappa_total = reweight.robust_steps.tolist()
    assert kappa_total == [20, 2, 20, 3]
    counts = reweight.class_count.double()
    assert counts.tolist() == [5, 2, 9, 3]
    reweight.update_weights()
    expected = published.weight_assign(kappa_total, counts, 4, 2.0)
    torch.testing.assert_close(reweight.class_weight, expected, **tolerance(torch.float64))
    assert not torch.allclose(expected, published.weight_assign(kappa_total, 19 / 4, 4, 2.0))  # not len(data) / C


def test_a_class_not_seen_counts_as_never_robust():
    reweight = FairReweight(3).double()
    labels = torch.tensor([0, 0, 1])
    tracked = reweight.track(ard_attack_loss(labels), labels)
    for _ in range(3):
        tracked(F.one_hot(labels, 3).double())
    reweight.update_weights()
    expected = published.weight_assign([6, 3, 0], torch.tensor([2.0, 1.0, 1.0]), 3, 2.0)
    torch.testing.assert_close(reweight.class_weight, expected, **tolerance(torch.float64))
    assert reweight.class_weight.tolist() == pytest.approx([5 / 6, 5 / 6, 5 / 2])


@pytest.mark.parametrize("beta", [0.0, 0.5, 30.0])
def test_weight_formula_is_stable_for_any_beta(beta):
    reweight = FairReweight(5, beta=beta).double()
    kappa = torch.tensor([0.0, 0.5, 3.0, 7.5, 10.0], dtype=torch.float64)
    got = reweight.weights_from(kappa)
    expected = published.weight_assign(kappa.tolist(), 1.0, 5, beta)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, **tolerance(torch.float64))
    fp32 = FairReweight(5, beta=beta).weights_from(kappa.float())
    assert torch.isfinite(fp32).all()  # (kappa + eps) ** -30 overflows fp32; the softmax form does not
    torch.testing.assert_close(fp32.double(), expected, **tolerance(torch.float32))


def test_an_epoch_without_samples_keeps_the_weights():
    reweight = FairReweight(3)
    reweight.class_weight.copy_(torch.tensor([1.0, 2.0, 0.9]))
    reweight.update_weights()
    assert reweight.class_weight.tolist() == pytest.approx([1.0, 2.0, 0.9])


def test_eval_mode_counts_nothing():
    reweight = FairReweight(3).eval()
    loss_fn = ard_attack_loss(torch.tensor([0, 1]))
    assert reweight.track(loss_fn, torch.tensor([0, 1])) is loss_fn
    reweight.record_step(torch.eye(3)[:2], torch.tensor([0, 1]))
    reweight.record_batch(torch.tensor([0, 1]))
    assert not reweight.robust_steps.any() and not reweight.class_count.any()


def test_state_stays_on_the_module_device_and_in_state_dict():
    reweight = FairReweight(3, beta=1.5)
    assert reweight.robust_steps.dtype == torch.int64 and reweight.class_count.dtype == torch.int64
    assert reweight.double().robust_steps.dtype == torch.int64 and reweight.class_weight.dtype == torch.float64
    labels = torch.tensor([0, 1, 2, 2])
    tracked = reweight.track(ard_attack_loss(labels), labels)
    tracked(torch.eye(3, dtype=torch.float64)[[0, 1, 0, 2]])
    reweight.update_weights()
    tracked = reweight.track(ard_attack_loss(labels), labels)
    tracked(torch.eye(3, dtype=torch.float64)[[0, 0, 2, 2]])
    buffer = io.BytesIO()
    torch.save(reweight.state_dict(), buffer)
    buffer.seek(0)
    restored = FairReweight(3, beta=1.5).double()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for name in ("class_weight", "robust_steps", "class_count"):
        assert torch.equal(getattr(restored, name), getattr(reweight, name)), name
    assert restored.robust_steps.tolist() == [1, 0, 2] and restored.class_count.tolist() == [1, 1, 2]
    assert not torch.equal(restored.class_weight, torch.ones(3, dtype=torch.float64))
    restored.update_weights()
    reweight.update_weights()
    assert torch.equal(restored.class_weight, reweight.class_weight)
    with pytest.raises(ValueError, match="device"):
        reweight.to("meta").sample_weight(labels)


def _batch_on_meta(method, classes=4, batch=6):
    """One training batch of ``method`` with re-weighting, every tensor on the meta device (no values to read)."""
    student = small_model(8, classes, dtype=torch.float32).to("meta")
    reweight = FairReweight(classes).to("meta")
    x = torch.empty(batch, 2, 2, 2, device="meta")
    labels = torch.zeros(batch, dtype=torch.long, device="meta")
    teacher_logits = torch.empty(batch, classes, device="meta")
    if method in ("rslad", "absld"):
        attack = kl_loss(torch.empty(batch, classes, device="meta"))
    else:
        attack = ard_attack_loss(labels)
    x_adv = pgd_loop(student, x, x + 0.001, reweight.track(attack, labels), eps=0.03, alpha=0.01, steps=2)
    weight = reweight.sample_weight(labels)
    adv_logits, nat_logits = student(x_adv), student(x)
    if method == "ard":
        loss = ARDLoss(alpha=0.5)(adv_logits, nat_logits, teacher_logits, labels, sample_weight=weight)
    elif method == "iad":
        loss = IADLoss(warmup_epochs=0).to("meta")(adv_logits, nat_logits, teacher_logits, labels, teacher_logits,
                                                   sample_weight=weight)
    elif method == "trades":
        loss = TRADESLoss()(adv_logits, nat_logits, labels, sample_weight=weight)
    else:
        loss_fn = ABSLDLoss(classes, beta=0.1 if method == "absld" else 0.0).to("meta")
        loss = loss_fn(adv_logits, nat_logits, teacher_logits, labels, sample_weight=weight)
        loss_fn.update_temperatures()
    loss.backward()
    reweight.update_weights()
    return loss, reweight


@pytest.mark.parametrize("method", ["ard", "iad", "rslad", "absld", "trades"])
def test_batch_and_epoch_update_read_no_values_on_the_host(method):
    """On the meta device any .item(), bool(tensor) or value-dependent branch raises: none happens per batch
    (attack with counting, weighted loss, backward) or in the epoch updates."""
    loss, reweight = _batch_on_meta(method)
    assert loss.device.type == "meta" and reweight.class_weight.device.type == "meta"


@pytest.mark.cuda
def test_no_sync_on_cuda():
    classes = 10
    student = small_model(8, classes, dtype=torch.float32).cuda()
    reweight = FairReweight(classes).cuda()
    x = images(32, shape=(2, 2, 2), dtype=torch.float32).cuda()
    labels = (torch.arange(32) % classes).cuda()
    (teacher_logits, teacher_adv), _ = logits_case(32, classes, count=2, dtype=torch.float32)
    teacher_logits, teacher_adv = teacher_logits.cuda(), teacher_adv.cuda()
    iad = IADLoss(warmup_epochs=0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        x_adv = pgd_loop(student, x, x + 0.001, reweight.track(ard_attack_loss(labels), labels), eps=0.03,
                         alpha=0.01, steps=3)
        weight = reweight.sample_weight(labels)
        adv_logits, nat_logits = student(x_adv), student(x)
        loss = (ARDLoss(alpha=0.5)(adv_logits, nat_logits, teacher_logits, labels, sample_weight=weight)
                + iad(adv_logits, nat_logits, teacher_logits, labels, teacher_adv, sample_weight=weight)
                + TRADESLoss()(adv_logits, nat_logits, labels, sample_weight=weight))
        loss.backward()
        reweight.update_weights()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_exported():
    assert fastabsld.FairReweight is FairReweight


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=3, beta=-1.0), "beta"),
    (dict(num_classes=3, weight_min=0.0), "weight_min"),
    (dict(num_classes=3, weight_min=2.0, weight_max=1.0), "weight_max"),
    (dict(num_classes=3, eps=0.0), "eps"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FairReweight(**kwargs)


def test_input_errors():
    reweight = FairReweight(3)
    with pytest.raises(ValueError, match="labels"):
        reweight.sample_weight(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        reweight.track(ard_attack_loss(torch.tensor([0])), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="loss_fn"):
        reweight.track(None, torch.tensor([0]))
    with pytest.raises(ValueError, match="logits"):
        reweight.record_step(torch.zeros(2, 4), torch.tensor([0, 1]))


# Two processes with the gloo backend: each rank counts its own batches, the weights must agree.

WORLD = 2
DIST_EPOCHS = 2


def rank_batches(rank, epoch):
    """Logits and labels of one rank's attack steps in one epoch: (steps, B, C) logits per batch."""
    gen = torch.Generator().manual_seed(100 * rank + 10 * epoch)
    batches = []
    for _ in range(2):
        labels = torch.randint(0, CLASSES, (5 + 2 * rank,), generator=gen)
        steps = torch.randn(4, labels.shape[0], CLASSES, generator=gen) + 2.0 * F.one_hot(labels, CLASSES)
        batches.append((steps, labels))
    return batches


def run_epoch(reweight, batches):
    for steps, labels in batches:
        tracked = reweight.track(lambda logits: logits.sum(), labels)
        for logits in steps:
            tracked(logits)


def ddp_worker(rank, port, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        reweight = FairReweight(CLASSES)
        history = []
        for epoch in range(DIST_EPOCHS):
            run_epoch(reweight, rank_batches(rank, epoch))
            reweight.update_weights()
            history.append(reweight.class_weight.clone())
        torch.save(history, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_weights_agree(tmp_path):
    assert run_processes(ddp_worker, WORLD, str(tmp_path)) == [0] * WORLD

    histories = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    single = FairReweight(CLASSES)
    for epoch in range(DIST_EPOCHS):
        kappa_total, counts = [0] * CLASSES, torch.zeros(CLASSES)
        for rank in range(WORLD):
            batches = rank_batches(rank, epoch)
            run_epoch(single, batches)
            for steps, labels in batches:
                kappa = (steps.argmax(dim=2) == labels).sum(dim=0).tolist()
                published.accumulate_kappa(kappa_total, kappa, labels)
                counts += torch.bincount(labels, minlength=CLASSES)
        single.update_weights()
        expected = published.weight_assign(kappa_total, counts.double(), CLASSES, 2.0).float()
        assert torch.equal(histories[0][epoch], histories[1][epoch]), epoch
        torch.testing.assert_close(histories[0][epoch], single.class_weight, **tolerance(torch.float32))
        torch.testing.assert_close(histories[0][epoch], expected, **tolerance(torch.float32))
    assert not torch.equal(histories[0][-1], torch.ones(CLASSES))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
