"""The BatchNorm-folded eval view against the model in eval mode, and the attack loop on it."""

import pytest
import torch
from torch import nn

from fastabsld.attack import kl_loss, pgd_loop
from fastabsld.recipe.fold import FoldedEvalView
from fastabsld.recipe.models import build_model
from tests.recipe.conftest import digits_models

NUM_CLASSES = 10


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
    assert len(view.folded) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
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
    _, teacher = digits_models(torch.float32)
    view = FoldedEvalView(teacher, channels_last=True).refresh()
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(view(x), teacher(x), atol=1e-5, rtol=1e-5)
    assert view.folded[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert teacher.features[0][0].weight.is_contiguous()


def test_folded_view_folds_sync_batchnorm():
    """Under --sync-bn the student's BatchNorms are SyncBatchNorm (no CPU kernel): the view still folds them."""
    student, _ = digits_models(torch.float32)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        expected = student.eval()(x)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    view = FoldedEvalView(converted)
    assert len(view.folded) == 4
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
    assert len(view.folded) == 1
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
