"""fastabsld.attack against torchattacks and the losses against their defining formulas."""

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from hypothesis import given, settings
from hypothesis import strategies as st

from fastabsld import attack, reference


def small_cnn(seed=0, batchnorm=False):
    """A deterministic small CNN for 3x8x8 inputs and 10 classes."""
    torch.manual_seed(seed)
    layers = [torch.nn.Conv2d(3, 6, 3, padding=1)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm2d(6))
    layers += [torch.nn.ReLU(), torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 10)]
    return torch.nn.Sequential(*layers)


def batch(size=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(size, 3, 8, 8, generator=gen), torch.randint(0, 10, (size,), generator=gen)


MODEL = small_cnn().eval()


@pytest.mark.parametrize(
    "norm, torchattack, eps, alpha",
    [("linf", torchattacks.PGD, 8 / 255, 2 / 255), ("l2", torchattacks.PGDL2, 0.5, 0.1)],
)
def test_pgd_matches_torchattacks(norm, torchattack, eps, alpha):
    x, y = batch()
    expected = torchattack(MODEL, eps=eps, alpha=alpha, steps=10, random_start=False)(x, y)
    out = attack.pgd(MODEL, x, attack.ce_loss(y, "mean"), eps=eps, alpha=alpha, steps=10, norm=norm,
                     random_start="none")
    assert not torch.equal(out, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_pgd_sum_reduction_takes_the_same_linf_steps():
    x, y = batch()
    expected = torchattacks.PGD(MODEL, eps=8 / 255, alpha=2 / 255, steps=5, random_start=False)(x, y)
    out = attack.pgd(MODEL, x, attack.ce_loss(y), eps=8 / 255, alpha=2 / 255, steps=5, random_start="none")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_fgsm_matches_torchattacks():
    x, y = batch()
    expected = torchattacks.FGSM(MODEL, eps=8 / 255)(x, y)
    torch.testing.assert_close(attack.fgsm(MODEL, x, attack.ce_loss(y), eps=8 / 255), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_pgd_keeps_model_mode_and_parameter_grads(training):
    model = small_cnn(batchnorm=True).train(training)
    x, y = batch()
    weight = model[0].weight
    weight.grad = torch.full_like(weight, 3.0)
    attack.pgd(model, x, attack.ce_loss(y), eps=8 / 255, alpha=2 / 255, steps=2)
    assert model.training is training and all(m.training is training for m in model)
    assert torch.equal(weight.grad, torch.full_like(weight, 3.0))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("run", ["pgd", "fgsm"])
def test_attack_on_a_training_model_runs_it_in_eval_mode(run):
    """By default the attack neither updates BatchNorm statistics nor uses batch statistics (as torchattacks)."""
    model = small_cnn(batchnorm=True)
    x, y = batch()
    model.train()
    with torch.no_grad():
        model(x)  # one training forward: num_batches_tracked = 1, non-trivial running statistics
    before = _bn_state(model)

    def attack_it(m, **kwargs):
        if run == "fgsm":
            return attack.fgsm(m, x, attack.ce_loss(y), eps=8 / 255, **kwargs)
        return attack.pgd(m, x, attack.ce_loss(y), eps=8 / 255, alpha=2 / 255, steps=5,
                          generator=torch.Generator().manual_seed(0), **kwargs)

    adversarial = attack_it(model)
    assert model.training and all(m.training for m in model)
    assert all(torch.equal(before[k], v) for k, v in _bn_state(model).items())
    # The reference: the same attack on a copy of the model put in eval mode by hand.
    import copy

    frozen = copy.deepcopy(model).eval()
    torch.testing.assert_close(adversarial, attack_it(frozen, eval_mode=False), rtol=0, atol=0)
    # eval_mode=False keeps the caller's train mode: each forward updates the statistics.
    attack_it(model, eval_mode=False)
    steps = 1 if run == "fgsm" else 5
    assert int(model[1].num_batches_tracked) == 1 + steps


def test_model_mode_leaves_plain_functions_alone():
    with attack.model_mode(torch.sin) as fn:
        assert fn is torch.sin


def test_pgd_under_no_grad_and_returns_detached():
    x, y = batch()
    with torch.no_grad():
        out = attack.pgd(MODEL, x, attack.ce_loss(y), eps=8 / 255, alpha=2 / 255, steps=2)
    assert not out.requires_grad and not torch.equal(out, x)


def test_normal_start_is_x_plus_scaled_noise_from_the_generator():
    x, _ = batch()
    out = attack.pgd(MODEL, x, None, eps=8 / 255, alpha=2 / 255, steps=0, random_start="normal",
                     generator=torch.Generator().manual_seed(7))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, x + 0.001 * noise, rtol=0, atol=0)


def test_normal_start_then_one_step_follows_the_recipe():
    x, y = batch()
    out = attack.pgd(MODEL, x, attack.ce_loss(y), eps=8 / 255, alpha=2 / 255, steps=1, random_start="normal",
                     generator=torch.Generator().manual_seed(7))
    start = (x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(MODEL(start), y, reduction="sum"), start)
    expected = reference.pgd_step(start.detach(), x, grad, 2 / 255, 8 / 255)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_uniform_start_is_seeded_and_inside_the_ball(norm):
    x, _ = batch()
    eps = 8 / 255 if norm == "linf" else 0.5

    def start(seed):
        return attack.pgd(MODEL, x, None, eps=eps, alpha=0.0, steps=0, norm=norm,
                          generator=torch.Generator().manual_seed(seed))

    assert torch.equal(start(3), start(3)) and not torch.equal(start(3), start(4))
    assert_in_ball_and_box(start(3), x, eps, norm)


def test_per_sample_eps_and_alpha_equal_separate_attacks():
    x, y = batch(3)
    eps = torch.tensor([2 / 255, 8 / 255, 0.0])
    alpha = torch.tensor([1 / 255, 2 / 255, 3 / 255])
    out = attack.pgd(MODEL, x, attack.ce_loss(y), eps=eps, alpha=alpha, steps=4, random_start="none")
    for i in range(3):
        single = attack.pgd(MODEL, x[i:i + 1], attack.ce_loss(y[i:i + 1]), eps=float(eps[i]), alpha=float(alpha[i]),
                            steps=4, random_start="none")
        torch.testing.assert_close(out[i:i + 1], single, rtol=0, atol=1e-6)


def assert_in_ball_and_box(out, x, eps, norm, clamp=(0.0, 1.0)):
    eps = torch.as_tensor(eps, dtype=torch.float32).reshape(-1)
    delta = (out - x).reshape(x.shape[0], -1)
    dist = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert bool((dist <= eps * (1 + 1e-5) + 1e-6).all()), (dist, eps)
    assert out.min() >= clamp[0] and out.max() <= clamp[1]


@settings(max_examples=20, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2"]),
    start=st.sampled_from(["uniform", "normal", "none"]),
    eps=st.floats(0.0, 1.0),
    alpha=st.floats(0.0, 0.5),
    steps=st.integers(1, 3),
    per_sample=st.booleans(),
    size=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_pgd_result_lies_in_the_ball_and_the_box(norm, start, eps, alpha, steps, per_sample, size, seed):
    x, y = batch(size, seed)
    radius = torch.linspace(0, eps, size) if per_sample else eps
    out = attack.pgd(MODEL, x, attack.ce_loss(y), eps=radius, alpha=alpha, steps=steps, norm=norm,
                     random_start=start, generator=torch.Generator().manual_seed(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_in_ball_and_box(out, x, radius, norm)


def test_kl_loss_is_the_summed_kl_to_the_soft_labels():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=gen, requires_grad=True)
    probs = torch.softmax(torch.randn(5, 4, generator=gen), dim=1)
    probs[0] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    loss = attack.kl_loss(probs)(logits)
    log_q = torch.log_softmax(logits, dim=1)
    terms = torch.where(probs > 0, probs * (torch.log(probs) - log_q), torch.zeros(()))
    expected = terms.sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.softmax(logits, 1) - probs)


def test_cw_loss_matches_the_rslad_margin():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=gen) * 30
    labels = torch.randint(0, 10, (6,), generator=gen)
    onehot = F.one_hot(labels, 10).float()
    real = (onehot * logits).sum(1)
    other = ((1 - onehot) * logits - onehot * 10000).max(1)[0]
    expected = -torch.clamp(real - other + 50, min=0).sum()
    torch.testing.assert_close(attack.cw_loss(labels)(logits), expected)
    torch.testing.assert_close(attack.cw_loss(labels, confidence=0)(logits),
                               -torch.clamp(real - other, min=0).sum())


@pytest.mark.parametrize(
    "kwargs, match",
    [({"norm": "l1"}, "norm"), ({"random_start": "zeros"}, "random_start"), ({"steps": -1}, "steps"),
     ({"eps": -1.0}, "eps"), ({"eps": -1.0, "steps": 0}, "eps"), ({"alpha": float("nan"), "steps": 0}, "alpha"),
     ({"clamp": (1.0, 0.0), "steps": 0}, "clamp"), ({"clamp": (1.0, 0.0)}, "clamp"),
     # A per-sample radius is refused as the number is, also when no step runs to check it.
     ({"eps": torch.tensor([-1.0, 0.1]), "steps": 0}, "eps must be non-negative"),
     ({"eps": torch.tensor([float("nan"), 0.1]), "steps": 0}, "eps must be non-negative"),
     ({"alpha": torch.tensor([0.1, -0.5]), "steps": 0}, "alpha must be non-negative"),
     ({"steps": None}, "steps"), ({"steps": 1.5}, "steps")],
)
def test_pgd_rejects_bad_arguments(kwargs, match):
    x, y = batch(2)
    args = {"eps": 8 / 255, "alpha": 2 / 255, "steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        attack.pgd(MODEL, x, attack.ce_loss(y), **args)


# ---- inputs an attack cannot work on: clear errors, and the empty batch ---------------------


@pytest.mark.parametrize("attack_fn", ["pgd", "pgd_loop", "fgsm"])
def test_inputs_outside_the_clamp_range_are_an_error(attack_fn):
    """Normalised images with the default [0, 1] clamp: the step's clamp would put the result far
    outside the eps-ball (1.95 away at eps 0.03), so the attack refuses them."""
    x, y = batch()
    x = (x - 0.5) / 0.25  # a usual normalisation: values in [-2, 2]
    kwargs = {"eps": 0.03}
    if attack_fn != "fgsm":
        kwargs.update(alpha=0.01, steps=2)
    args = (MODEL, x, x.clone()) if attack_fn == "pgd_loop" else (MODEL, x)
    with pytest.raises(ValueError, match=r"x must lie inside clamp=\(0, 1\), got values in \[-2"):
        getattr(attack, attack_fn)(*args, attack.ce_loss(y), **kwargs)


def test_inputs_in_another_range_attack_with_that_range_as_clamp():
    x, y = batch()
    x = (x - 0.5) / 0.25
    out = attack.pgd(MODEL, x, attack.ce_loss(y), eps=0.03, alpha=0.01, steps=3, clamp=(-2.0, 2.0))
    assert float((out - x).abs().max()) <= 0.03 + 1e-6
    unclamped = attack.pgd(MODEL, x, attack.ce_loss(y), eps=0.03, alpha=0.01, steps=3,
                           clamp=(-float("inf"), float("inf")))
    assert float((unclamped - x).abs().max()) <= 0.03 + 1e-6


@pytest.mark.parametrize("targets", ["logits", "log_probs", "unnormalised", "bf16_logits"])
def test_kl_loss_rejects_targets_that_are_not_probabilities(targets):
    """Logits as targets made the loss NaN and the attack silently return its start."""
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(3))
    value = {"logits": logits, "log_probs": logits.log_softmax(1), "unnormalised": logits.softmax(1) * 0.9,
             "bf16_logits": logits.bfloat16()}[targets]
    with pytest.raises(ValueError, match="teacher_probs"):
        attack.kl_loss(value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("classes", [2, 10, 100, 1000])
def test_kl_loss_accepts_softmax_rows_of_every_dtype(dtype, classes):
    """The sum-to-1 tolerance (C units in the last place) admits every softmax the dtype rounds."""
    gen = torch.Generator().manual_seed(classes)
    probs = (4 * torch.randn(16, classes, generator=gen)).softmax(1).to(dtype)
    attack.kl_loss(probs)
    attack.kl_loss((4 * torch.randn(16, classes, generator=gen)).to(dtype).softmax(1))
    attack.kl_loss(F.one_hot(torch.arange(16) % classes, classes).to(dtype))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("start", attack.RANDOM_STARTS)
def test_an_empty_batch_gives_an_empty_result(norm, start):
    x, y = batch(size=0)
    out = attack.pgd(MODEL, x, attack.ce_loss(y), eps=0.5, alpha=0.1, steps=2, norm=norm, random_start=start)
    assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize("attack_fn", ["pgd", "pgd_loop", "fgsm"])
def test_inference_mode_is_an_error(attack_fn):
    x, y = batch()
    kwargs = {"eps": 0.03}
    if attack_fn != "fgsm":
        kwargs.update(alpha=0.01, steps=2)
    args = (MODEL, x, x.clone()) if attack_fn == "pgd_loop" else (MODEL, x)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inside torch.inference_mode"):
        getattr(attack, attack_fn)(*args, attack.ce_loss(y), **kwargs)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("start", attack.RANDOM_STARTS)
def test_integer_images_are_an_error(dtype, start):
    x, y = batch()
    images = (x * 255).to(dtype)
    with pytest.raises(ValueError, match=f"x must be floating point .*got {dtype}"):
        attack.pgd(MODEL, images, attack.ce_loss(y), eps=0.03, alpha=0.01, steps=2, random_start=start)
