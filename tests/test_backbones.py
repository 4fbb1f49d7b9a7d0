"""Backbones: registry names, published parameter counts, output/feature shapes, and the
numerical properties training relies on (eval determinism, channels_last, bf16 autocast)."""

from __future__ import annotations

import pytest
import torch

from qualiface.backbones import BACKBONES, build_backbone
from qualiface.registry import RegistryError

IRESNET_NAMES = ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200"]


def _param_count(name: str, **kwargs) -> int:
    # Built on the meta device: counts parameters without allocating or initialising them.
    with torch.device("meta"):
        model = build_backbone(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, expected_millions",
    [("iresnet50", 43.6), ("iresnet100", 65.2), ("mobilefacenet", 1.2)],
)
def test_parameter_counts_match_published_sizes(name, expected_millions):
    count = _param_count(name)
    assert abs(count / 1e6 - expected_millions) / expected_millions < 0.01, count


def test_deeper_iresnets_are_strictly_larger_and_128d_mobilefacenet_is_about_1m():
    counts = [_param_count(name) for name in IRESNET_NAMES]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert 0.95e6 < _param_count("mobilefacenet", embedding_size=128) < 1.05e6


def test_all_names_registered_and_unknown_name_lists_known():
    for name in [*IRESNET_NAMES, "iresnet-nano", "mobilefacenet"]:
        assert name in BACKBONES
    with pytest.raises(RegistryError, match="iresnet50"):
        build_backbone("iresnet51")


def _thin(name: str, **kwargs):
    # Thin variants keep the real depth/topology but cost a few MFLOPs per image.
    if name == "mobilefacenet":
        kwargs.setdefault("width_mult", 0.125)
    elif name != "iresnet-nano":
        kwargs.setdefault("base_width", 4)
    torch.manual_seed(0)
    return build_backbone(name, **kwargs)


@pytest.mark.parametrize("name", ["iresnet18", "iresnet34", "iresnet-nano", "mobilefacenet"])
def test_output_and_feature_shapes_at_112(name):
    model = _thin(name, embedding_size=32).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        embedding, features = model(x, return_features=True)
        plain = model(x)
    assert embedding.shape == (2, 32) and model.embedding_size == 32
    assert features.shape == (2, model.feature_dim)
    torch.testing.assert_close(plain, embedding)
    # Final map is 7x7: feature_dim = channels of the last stage * 49.
    assert model.feature_dim % 49 == 0


def test_iresnet_feature_dim_follows_width_and_input_size():
    assert _thin("iresnet18", base_width=64).feature_dim == 512 * 7 * 7
    assert build_backbone("iresnet-nano").feature_dim == 128 * 7 * 7
    small = _thin("iresnet18", base_width=4, input_size=32).eval()
    with torch.no_grad():
        _, features = small(torch.randn(1, 3, 32, 32), return_features=True)
    assert features.shape == (1, 32 * 2 * 2)


def test_bad_constructor_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_backbone("iresnet18", input_size=100)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_backbone("mobilefacenet", input_size=100)
    with pytest.raises(ValueError, match="dropout"):
        build_backbone("iresnet-nano", dropout=1.5)


def test_embedding_bn_scale_is_frozen_and_fc_sees_the_returned_features():
    model = _thin("iresnet18", embedding_size=16).eval()
    assert not model.features.weight.requires_grad
    assert torch.all(model.features.weight == 1)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        embedding, features = model(x, return_features=True)
        # Independent recomputation of the head from the returned features (eval BN1d formula).
        bn = model.features
        z = model.fc(features)
        expected = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(embedding, expected)


def test_dropout_does_not_alter_returned_features():
    model = _thin("iresnet18", embedding_size=16, dropout=0.5).train()
    x = torch.randn(4, 3, 112, 112)
    _, features = model(x, return_features=True)
    with torch.no_grad():
        h = model.layer4(model.layer3(model.layer2(model.layer1(
            model.prelu(model.bn1(model.conv1(x)))))))
        # bn2 in train mode normalises with batch statistics, so recompute it the same way.
        expected = torch.flatten(torch.nn.functional.batch_norm(
            h, None, None, model.bn2.weight, model.bn2.bias, training=True, eps=model.bn2.eps), 1)
    torch.testing.assert_close(features.detach(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["iresnet-nano", "mobilefacenet"])
def test_eval_mode_is_deterministic(name):
    model = _thin(name, embedding_size=32).eval()
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        # Batch composition must not matter in eval mode (BN uses running statistics).
        torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["iresnet-nano", "mobilefacenet"])
def test_channels_last_gives_the_same_output(name):
    model = _thin(name, embedding_size=32).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        reference, ref_features = model(x, return_features=True)
        model = model.to(memory_format=torch.channels_last)
        out, features = model(x.to(memory_format=torch.channels_last), return_features=True)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["iresnet-nano", "mobilefacenet"])
def test_bf16_autocast_forward_and_backward_are_finite(name):
    model = _thin(name, embedding_size=32).train()
    x = torch.randn(4, 3, 112, 112)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embedding, features = model(x, return_features=True)
    assert torch.isfinite(embedding.float()).all() and torch.isfinite(features.float()).all()
    embedding.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
    # bf16 keeps ~3 significant digits: the embedding direction must survive.
    cosine = torch.nn.functional.cosine_similarity(low, reference, dim=1)
    assert torch.all(cosine > 0.95), cosine


def test_strided_pointwise_conv_equals_a_strided_1x1_conv():
    from qualiface.backbones.iresnet import StridedPointwiseConv

    torch.manual_seed(0)
    conv = StridedPointwiseConv(6, 10, stride=2)
    x = torch.randn(2, 6, 15, 15)  # odd size: the strided conv keeps ceil(15 / 2) = 8 positions
    expected = torch.nn.functional.conv2d(x, conv.weight, stride=2)
    torch.testing.assert_close(conv(x), expected)
    assert set(conv.state_dict()) == {"weight"}


def test_thin_nets_train_in_channels_last_without_crashing():
    # Thin nets once hit a PyTorch CPU crash (strided 1x1 conv backward, < 16 channels,
    # channels_last). Run in a subprocess so a regression fails this test, not the whole run.
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import torch
        from qualiface.backbones import build_backbone
        torch.set_num_threads(1)
        thin = [("iresnet18", {"base_width": 8}), ("mobilefacenet", {"width_mult": 0.125})]
        for name, kw in thin:
            net = build_backbone(name, embedding_size=16, **kw)
            net = net.to(memory_format=torch.channels_last)
            x = torch.randn(4, 3, 112, 112).contiguous(memory_format=torch.channels_last)
            net(x).square().mean().backward()
            assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_embedding_scale_is_frozen_by_default_and_learnable_on_request():
    from qualiface.backbones import build_backbone

    frozen = build_backbone("iresnet-nano", embedding_size=8, input_size=32)
    learnable = build_backbone("iresnet-nano", embedding_size=8, input_size=32,
                               learnable_embedding_scale=True)
    assert not frozen.features.weight.requires_grad
    assert learnable.features.weight.requires_grad
    # The frozen scale pins the mean squared norm of a training batch at >= D (the BN output
    # has unit variance per dimension); a learned scale can move it below.
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        learnable.features.weight.mul_(0.1)
        learnable.features.bias.zero_()
    frozen.features.bias.data.zero_()
    assert frozen.train()(x).pow(2).sum(1).mean() > 8 * 0.9
    assert learnable.train()(x).pow(2).sum(1).mean() < 8 * 0.1
