"""The recipe's model zoo: forward shapes, sizes and names."""

import pytest
import torch

from fastabsld.recipe.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_channels,size", [(1, 8), (3, 32)])
def test_every_registered_model_maps_images_to_logits(name, in_channels, size):
    model = build_model(name, 7, in_channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_model_sizes_and_bad_name():
    def count(name):
        return sum(p.numel() for p in build_model(name, 10, 3).parameters())

    # Standard sizes: ResNet-18 ~11.2M, MobileNetV2 ~2.2M, WRN-34-10 ~46.2M parameters.
    assert 11.0e6 < count("resnet18") < 11.3e6
    assert 2.2e6 < count("mobilenetv2") < 2.4e6
    assert 46.0e6 < count("wrn-34-10") < 46.3e6
    assert count("cnn-s") < count("cnn-l")
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vgg", 10, 3)
