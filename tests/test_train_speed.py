"""The fast training step against the released loop, and its speed options (amp, channels_last, compile, folding)."""

import copy

import pytest
import torch
from torch import nn

from benchmarks.released_loop import released_step
from fastabsld import fast_step
from fastabsld.attack import kl_loss, pgd_loop
from fastabsld.cli import build_parser
from fastabsld.fold import FoldedEvalView
from fastabsld.models import build_model
from fastabsld.train import TrainConfig, build_loss, train_epoch
from tests.train_helpers import one_thread  # noqa: F401  (autouse fixture)

NUM_CLASSES = 10


def _batches(count, batch, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 1, 8, 8, generator=gen, dtype=dtype),
             torch.randint(0, NUM_CLASSES, (batch,), generator=gen)) for _ in range(count)]


def _models(dtype, seed=3):
    torch.manual_seed(seed)
    teacher = build_model("cnn-l", NUM_CLASSES, 1).to(dtype)
    teacher.train()
    teacher(torch.rand(64, 1, 8, 8, dtype=dtype))  # non-trivial BatchNorm statistics
    student = build_model("cnn-s", NUM_CLASSES, 1).to(dtype)
    student.train()
    with torch.no_grad():
        student(torch.rand(64, 1, 8, 8, dtype=dtype))
    return student, teacher.eval().requires_grad_(False)


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)


def _fast_run(student, teacher, batches, cfg, taus, *, channels_last=False):
    """Two fastabsld steps through train_epoch; returns (mean loss, student, loss module)."""
    loss_fn = build_loss(cfg, NUM_CLASSES).to(batches[0][0].dtype)
    loss_fn.tau_adv.copy_(taus[0])
    loss_fn.tau_nat.copy_(taus[1])
    if channels_last:
        student, teacher = student.to(memory_format=torch.channels_last), teacher.to(memory_format=torch.channels_last)
    step_student, view, teacher = fast_step.step_models(student, cfg, teacher=teacher)
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
    student, teacher = _models(dtype)
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
        student, teacher = _models(torch.float32)
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
        student, teacher = _models(torch.float32)
        losses.append(_fast_run(student, teacher, batches, TrainConfig(amp=amp, progress=False), taus)[0])
    assert losses[1].dtype == torch.float32 and torch.isfinite(losses[1])
    # bf16 keeps 8 bits of mantissa: the loss agrees to about 1e-2 relative (the attack may move a few pixels).
    torch.testing.assert_close(losses[1], losses[0], rtol=5e-2, atol=1e-3)


def test_forward_fp32_autocasts_and_returns_fp32():
    model = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x).float()
    out = fast_step.forward_fp32(model, x, amp=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(fast_step.forward_fp32(model, x, amp=False), model(x))


@pytest.mark.parametrize("name", ["cnn-s", "resnet18", "mobilenetv2"])
def test_folded_view_equals_eval_model(name):
    torch.manual_seed(0)
    channels, size = (1, 8) if name == "cnn-s" else (3, 16)
    model = build_model(name, NUM_CLASSES, channels)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, channels, size, size))
    model.eval()
    view = FoldedEvalView(model)
    assert view.num_folded == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.rand(4, channels, size, size, requires_grad=True)
    (grad_ref,) = torch.autograd.grad(model(x).square().sum(), x)
    (grad_view,) = torch.autograd.grad(view(x).square().sum(), x)
    torch.testing.assert_close(view(x), model(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_view, grad_ref, atol=1e-5, rtol=1e-4)
    assert not any(p.grad is not None for p in model.parameters())
    # The view follows the model after refresh() (weights and statistics changed by training).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, channels, size, size))
    model.eval()
    assert not torch.allclose(view(x), model(x), atol=1e-4)
    torch.testing.assert_close(view.refresh()(x), model(x), atol=1e-5, rtol=1e-5)


def test_channels_last_view_of_a_contiguous_model():
    """The teacher's view: folded weights and inputs in channels_last, the model's own weights untouched."""
    _, teacher = _models(torch.float32)
    view = FoldedEvalView(teacher, channels_last=True).refresh()
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(view(x), teacher(x), atol=1e-5, rtol=1e-5)
    assert view.folded[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert teacher.features[0][0].weight.is_contiguous()


def test_folded_view_folds_sync_batchnorm():
    """Under --sync-bn the student's BatchNorms are SyncBatchNorm (no CPU kernel): the view still folds them."""
    student, _ = _models(torch.float32)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        expected = student.eval()(x)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    view = FoldedEvalView(converted)
    assert view.num_folded == 4
    with torch.no_grad():
        torch.testing.assert_close(view(x), expected, atol=1e-5, rtol=1e-5)


def test_folded_view_handles_conv_bias_and_plain_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=True), nn.BatchNorm2d(3, affine=False), nn.ReLU(),
                          nn.Conv2d(3, 3, 1), nn.Flatten(), nn.BatchNorm1d(48))
    model.train()
    model(torch.randn(8, 2, 4, 4))
    model.eval()
    view = FoldedEvalView(model)
    assert view.num_folded == 1
    x = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(view(x), model(x), atol=1e-5, rtol=1e-5)
    assert model[1] is not None and len(model) == 6  # the model itself is untouched


def test_attack_loop_has_no_data_dependent_host_sync():
    """pgd_loop on the folded view runs on the meta device (no values): nothing in it reads tensor values on the
    host, as a CUDA-graph capture requires."""
    model = build_model("cnn-s", NUM_CLASSES, 1).eval().to("meta")
    view = FoldedEvalView(model)
    x = torch.empty(4, 1, 8, 8, device="meta")
    probs = torch.empty(4, NUM_CLASSES, device="meta")
    out = pgd_loop(view, x, x + 0.001, kl_loss(probs), eps=0.1, alpha=0.025, steps=2)
    assert out.shape == x.shape and out.device.type == "meta"


def test_cli_speed_flags_reach_the_config():
    parser = build_parser()
    args = parser.parse_args(["train", "--amp", "--channels-last", "--compile", "--no-fold-bn"])
    from fastabsld.cli import _speed_options

    assert _speed_options(args) == {"amp": True, "channels_last": True, "compile": True, "fold_bn": False}
    defaults = _speed_options(parser.parse_args(["demo"]))
    assert defaults == {"amp": False, "channels_last": False, "compile": False, "fold_bn": True}


def test_compiled_step_runs_and_matches_eager():
    """--compile: one tiny step through torch.compile (inductor) gives the eager step's loss."""
    batches = _batches(1, 16, torch.float32)
    taus = _taus(torch.float32)
    losses = []
    for compile_ in (False, True):
        student, teacher = _models(torch.float32)
        cfg = TrainConfig(compile=compile_, steps=2, progress=False)
        losses.append(_fast_run(student, teacher, batches, cfg, taus)[0])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
