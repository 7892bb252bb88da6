"""Model registry: the field's ConvNet-D, small-stem ResNets, timm and
torchvision names; every factory has the same signature."""
import pytest
import torch
from torch import nn

from rd3core.models import ConvNet, create_model, list_models, MODELS
from rd3core.registry import UnknownName


@pytest.mark.parametrize("name", list_models())
def test_every_listed_model_builds_and_runs_on_32px(name):
    model = create_model(name, 10, 3, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_convnet_d_is_width_128_instance_norm_avg_pool():
    model = create_model("convnet3", 10, 3, 32)
    assert isinstance(model, ConvNet)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(convs) == 3 and all(c.out_channels == 128 for c in convs)
    assert all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)  # instance norm
    assert sum(isinstance(m, nn.AvgPool2d) for m in model.modules()) == 3
    assert model.classifier.in_features == 128 * 4 * 4


def test_convnet_grammar():
    m = create_model("convnet4-w32-bn", 7, 1, 16)
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 4
    assert m(torch.randn(3, 1, 16, 16)).shape == (3, 7)
    plain = create_model("convnet2-nn", 2, 3, 8)
    assert not any(isinstance(x, (nn.BatchNorm2d, nn.GroupNorm)) for x in plain.modules())
    with pytest.raises(ValueError, match="below one pixel"):
        create_model("convnet6", 10, 3, 32)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnets_get_a_3x3_stem_without_maxpool_for_small_inputs(arch):
    small = create_model(arch, 10, 3, 32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large = create_model(arch, 10, 3, 224)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)


def test_timm_and_torchvision_names_resolve():
    assert "timm/resnet10t" in MODELS and "tv/mobilenet_v2" in MODELS
    assert create_model("tv/shufflenet_v2_x0_5", 5, 3, 32)(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert create_model("timm/resnet10t", 5, 3, 32)(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_unknown_model_names_suggest_close_matches():
    with pytest.raises(UnknownName, match="did you mean"):
        create_model("resnet81", 10, 3, 32)


def test_timm_and_torchvision_names_they_do_not_know_are_unknown():
    # Any timm/<name> used to resolve, failing only when a worker built it.
    for name in ("timm/resnet18x", "tv/resnet181"):
        assert name not in MODELS
        with pytest.raises(UnknownName, match="has no model"):
            create_model(name, 10, 3, 32)
    assert "did you mean timm/resnet18" in MODELS.unknown_message("timm/resnet18x")
    assert "timm/resnet18.a1_in1k" in MODELS  # a pretrained tag names the same architecture


def test_timm_models_get_the_dataset_input_size():
    # A ViT is built for the dataset's side (img_size), a CNN takes any size.
    vit = create_model("timm/vit_tiny_patch16_224", 10, 3, 32)
    assert vit.patch_embed.img_size == (32, 32)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 10)
