"""The Pale-T/S/B family: sizes, costs, shapes, the timm API, checkpoints and stochastic depth."""
import pytest
import safetensors.torch
import timm
import torch

import pale  # noqa: F401
from pale.cli import main as pale_main
from pale.complexity import measure_cost
from pale.models.pale_transformer import PaleTransformer

VARIANTS = ["pale_tiny", "pale_small", "pale_base"]
# Parameters (exact, our arithmetic; the paper's 22M/48M/85M rounded) and multiply-adds at 224 (the paper's, +-2%).
EXPECTED = {"pale_tiny": (21.75e6, 4.2e9), "pale_small": (48.31e6, 9.0e9), "pale_base": (85.32e6, 15.6e9)}


def tiny(**kw):
    """A small configuration for fast tests."""
    args = dict(embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 2), num_heads=(2, 2, 4, 4), num_classes=5)
    args.update(kw)
    return PaleTransformer(**args)


@pytest.mark.parametrize("name", VARIANTS)
def test_params_and_macs_match_paper(name):
    model = timm.create_model(name)
    cost = measure_cost(model, (224, 224))
    params, macs = EXPECTED[name]
    assert round(cost.params / 1e6, 2) == round(params / 1e6, 2)
    assert abs(cost.macs / macs - 1) < 0.02, cost.macs


def test_pale_info_prints_table(capsys):
    assert pale_main(["info", "pale_tiny"]) == 0
    out = capsys.readouterr().out
    assert "stages.3" in out and "21.75M" in out and "4.20G" in out


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("size", [(224, 224), (97, 131), (32, 32), (250, 333)])
def test_forward_backward_any_size(name, size):
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.1)
    # batch 2: the q/k/v BatchNorms need more than one value per channel in training (32x32 ends 1x1)
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)


def test_features_only_nchw_at_512x1024():
    model = timm.create_model("pale_tiny", features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [64, 128, 256, 512]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 512, 1024))
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 128, 256), (1, 128, 64, 128), (1, 256, 32, 64), (1, 512, 16, 32)]


def test_features_only_out_indices():
    model = timm.create_model("pale_tiny", features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == [128, 512]


def test_forward_intermediates_matches_forward_features():
    model = tiny().eval()
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert final.shape == model.forward_features(x).shape
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[-2:] for t in inter] == [(17, 22), (9, 11), (5, 6), (3, 3)]
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(only) == 2
        torch.testing.assert_close(only[-1], inter[-1])


def test_deep_stem_halves_instead_of_quartering():
    # the stem of the demo: 3x3 convolutions with a ceil-mode 2x2 pool, so every stage's map is twice the
    # paper stem's (which maps 27 -> 7); the learned position tables follow the same grids
    model = tiny(stem_type="deep", pos_embed="ape", img_size=(27, 31)).eval()
    assert [i["reduction"] for i in model.feature_info] == [2, 4, 8, 16]
    assert [tuple(s.pos_embed.shape[1:3]) for s in model.stages] == [(14, 16), (7, 8), (4, 4), (2, 2)]
    with torch.no_grad():
        inter = model.forward_intermediates(torch.randn(2, 3, 27, 31), intermediates_only=True)
    assert [tuple(t.shape[-2:]) for t in inter] == [(14, 16), (7, 8), (4, 4), (2, 2)]
    assert [tuple(t.shape[-2:]) for t in tiny().eval().forward_intermediates(
        torch.randn(1, 3, 27, 31), intermediates_only=True)][0] == (7, 8)
    features = timm.create_model("pale_tiny", stem_type="deep", features_only=True)
    assert features.feature_info.reduction() == [2, 4, 8, 16]
    x = torch.randn(2, 3, 28, 28, requires_grad=True)
    model.train()(x).sum().backward()
    assert x.grad.abs().sum() > 0 and model.stem.convs[0].conv.weight.grad is not None


def test_deep_stem_weights_load_into_one_channel_through_timm(tmp_path):
    # timm adapts the pretrained_cfg's first_conv to another in_chans (for 1 channel: the sum over RGB);
    # for the deep stem that is its first 3x3 convolution, not the 7x7 stem's stem.proj
    kwargs = dict(stem_type="deep", num_classes=5, embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1),
                  num_heads=(2, 2, 2, 2))
    rgb = timm.create_model("pale_tiny", **kwargs)
    safetensors.torch.save_file(rgb.state_dict(), str(tmp_path / "w.safetensors"))
    gray = timm.create_model("pale_tiny", in_chans=1, pretrained=True, **kwargs,
                             pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors"), num_classes=5))
    torch.testing.assert_close(gray.stem.convs[0].conv.weight, rgb.stem.convs[0].conv.weight.sum(1, keepdim=True))
    torch.testing.assert_close(gray.stages[0].blocks[0].mlp.fc1.weight, rgb.stages[0].blocks[0].mlp.fc1.weight)


def test_prune_intermediate_layers():
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
    kept = model.prune_intermediate_layers(indices=[0, 1])
    assert kept == [0, 1]
    assert len(model.stages) == 2
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        # the final norm and head were sized for stage 3: the pruned model ends at stage 1, unnormed
        final, _ = model.forward_intermediates(x, indices=[0, 1])
        out = model(x)   # the head is reset without pooling, as timm's prune does
    torch.testing.assert_close(pruned[1], full[1])
    torch.testing.assert_close(final.permute(0, 3, 1, 2), full[1])
    torch.testing.assert_close(out.permute(0, 3, 1, 2), full[1])
    assert model.num_features == model.head_hidden_size == 32


def test_forward_head_pre_logits():
    model = tiny().eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 64, 64))
        assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
        assert model.forward_head(feats).shape == (2, 5)


def test_reset_classifier():
    model = tiny().eval()
    model.reset_classifier(11)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 11)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    # a new head is made where the model is and in its type, also from a head without parameters
    for kwargs in (dict(device="meta"), dict(dtype=torch.bfloat16)):
        model = tiny(num_classes=0, **kwargs)
        model.reset_classifier(3)
        assert (model.head.fc.weight.device.type, model.head.fc.weight.dtype) == (
            model.stem.proj.weight.device.type, model.stem.proj.weight.dtype)


def test_features_only_follows_the_number_of_stages():
    model = timm.create_model("pale_tiny", features_only=True, embed_dims=(16, 32, 64), depths=(1, 1, 1),
                              num_heads=(2, 2, 2))
    assert model.feature_info.reduction() == [4, 8, 16]
    with torch.no_grad():
        assert [f.shape[1] for f in model(torch.randn(1, 3, 64, 64))] == [16, 32, 64]


def test_pretrained_cfg():
    model = timm.create_model("pale_tiny")
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "stem.proj" and cfg["classifier"] == "head.fc"
    assert cfg["interpolation"] == "bicubic" and cfg["input_size"] == (3, 224, 224)
    assert dict(model.named_parameters())["stem.proj.weight"].shape[1] == 3
    assert model.get_classifier() is model.head.fc


@pytest.mark.parametrize("name", VARIANTS)
def test_data_config_evaluates_as_the_paper_resize_256x256_then_centre_crop_224(name):
    from PIL import Image
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_model_data_config
    from torchvision import transforms as T

    config = resolve_model_data_config(timm.create_model(name, device="meta"))
    assert config["crop_pct"] == 0.875 and config["crop_mode"] == "squash"
    image = Image.fromarray(torch.randint(0, 256, (300, 451, 3), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(0)).numpy())
    by_hand = T.Compose([T.Resize((256, 256), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                         T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    out = create_transform(**config, is_training=False)(image)
    assert out.shape == (3, 224, 224)
    assert torch.equal(out, by_hand(image))


def test_group_matcher_and_no_weight_decay():
    from timm.models import group_parameters
    model = tiny(pos_embed="ape")
    groups = group_parameters(model, model.group_matcher())
    names = {n for g in groups.values() for n in g}
    assert names == {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() == {f"stages.{i}.pos_embed" for i in range(4)}
    # a stage's position table goes with its patch merging (layer-wise lr decay)
    for i in range(1, 4):
        assert any({f"stages.{i}.pos_embed", f"stages.{i}.downsample.proj.weight"} <= set(g) for g in groups.values())
    assert tiny().no_weight_decay() == set()


def test_grad_checkpointing_same_result():
    model = tiny().train()
    x = torch.randn(2, 3, 48, 48)
    torch.manual_seed(1)
    ref = model(x)
    ref.sum().backward()
    g_ref = model.stem.proj.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model.stem.proj.weight.grad, g_ref)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_round_trip_through_timm(tmp_path, suffix):
    model = timm.create_model("pale_tiny", num_classes=10).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(model.state_dict(), str(path))
    else:
        torch.save({"model": model.state_dict()}, path)
    # num_classes goes in the overlay too: timm drops a classifier whose size differs from the cfg's.
    loaded = timm.create_model("pale_tiny", num_classes=10, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_weight_init():
    model = tiny()
    lin = model.stages[0].blocks[0].mlp.fc1
    assert lin.bias.abs().max() == 0
    assert 0.018 < lin.weight.std() < 0.022
    ln = model.stages[0].blocks[0].norm1
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)


def test_eval_is_deterministic():
    model = tiny(drop_path_rate=0.5, drop_rate=0.5).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_stochastic_depth_rates_rise_linearly():
    model = timm.create_model("pale_tiny", drop_path_rate=0.2)
    rates = []
    for stage in model.stages:
        for block in stage.blocks:
            dp = block.drop_path1
            rates.append(dp.drop_prob if hasattr(dp, "drop_prob") else 0.0)
            assert type(block.drop_path2) is type(dp)
    assert len(rates) == 22
    expected = torch.linspace(0, 0.2, 22)
    torch.testing.assert_close(torch.tensor(rates), expected)


def test_train_mode_applies_stochastic_depth():
    model = tiny(drop_path_rate=0.9).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.equal(a, b)
    # A block whose branches are both dropped leaves a sample unchanged: check it happens at the
    # configured rate on the last block (rate 0.9), on many samples.
    block = model.stages[-1].blocks[-1]
    block.cpe = None
    y = torch.randn(2000, 2, 2, 64)
    with torch.no_grad():
        unchanged = (block(y) == y).flatten(1).all(1).float().mean().item()
    assert 0.75 < unchanged < 0.87  # both dropped: 0.9 * 0.9 = 0.81


@pytest.mark.parametrize("x,err,match", [
    (torch.randn(3, 32, 32), ValueError, r"image batch of shape \(B, 3, H, W\)"),
    (torch.randn(1, 1, 32, 32), ValueError, "expected 3 input channels, got 1"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
    (torch.randn(1, 3, 2, 32), ValueError, "at least 3x3"),
])
def test_bad_model_input(x, err, match):
    with pytest.raises(err, match=match):
        tiny()(x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(pos_embed="sinusoid"), "unknown position encoding"),
    (dict(attn_mode="global"), "unknown attention mode"),
    (dict(num_heads=(2, 2, 1, 4)), "must be even"),
    (dict(pale_size=(7, 7, 7)), "pale_size must be"),
    (dict(depths=(1, 1, 1)), "one entry per stage"),
    (dict(stem_type="deep_conv"), r"unknown stem type 'deep_conv'; expected one of \('overlap', 'deep'\)"),
])
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_cpe_is_residual_depthwise_conv():
    """CPE folds its residual into the conv's centre tap: same values and gradients as x + conv(x)."""
    from pale.models.pale_transformer import ConvPosEnc
    cpe = ConvPosEnc(8).double()
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64, requires_grad=True)
    out = cpe(x)
    expected = x + cpe.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, cpe.proj.weight), grad),
                    torch.autograd.grad(expected, (x, cpe.proj.weight), grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert "identity" not in cpe.state_dict()  # the folded identity is not a saved parameter


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (2, 5), (3, 3), (4, 6)])
def test_depthwise_conv_on_maps_smaller_than_the_kernel(size):
    """The explicit-padding path for maps under 3x3 gives the padded convolution's values and
    gradients, as the convolution layers of CPE and the separable projections use it."""
    from pale.models.pale_transformer import ConvPosEnc, SeparableProjection, depthwise_conv3x3
    x = torch.randn(2, *size, 6, dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_()  # an NCHW view of NHWC
    weight = torch.randn(6, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out = depthwise_conv3x3(x, weight, bias)
    expected = torch.nn.functional.conv2d(x, weight, bias, padding=1, groups=6)
    assert out.shape == expected.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, weight, bias), grad),
                    torch.autograd.grad(expected, (x, weight, bias), grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the layers: CPE and the projection (train-mode BatchNorm and folded eval-mode BatchNorm) on NHWC maps
    tokens = torch.randn(2, *size, 6, dtype=torch.float64)
    cpe = ConvPosEnc(6).double()
    torch.testing.assert_close(cpe(tokens), tokens + cpe.proj(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    proj = SeparableProjection(6).double()
    for training in (True, False):
        proj.train(training)
        reference = proj.pw(proj.bn(proj.dw(tokens.permute(0, 3, 1, 2))).permute(0, 2, 3, 1))
        torch.testing.assert_close(proj(tokens), reference)


@pytest.mark.parametrize("mode", ["parallel", "sequential", "vanilla", "axial", "cross_shaped"])
@pytest.mark.parametrize("kernel", ["flash", "explicit"])
def test_an_empty_batch_gives_empty_outputs(mode, kernel):
    # used to fail inside a reshape ("cannot reshape tensor of 0 elements ... -1 ... ambiguous")
    from pale.models.attention_kernels import use_kernel

    model = PaleTransformer(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), num_classes=3,
                            attn_mode=mode, pale_size=2)
    for size in [(64, 64), (33, 47)]:  # square maps take the one-call path; others pad and mask
        with use_kernel(kernel):
            x = torch.randn(0, 3, *size, requires_grad=True)
            logits = model.train()(x)
            logits.sum().backward()
            assert logits.shape == (0, 3) and x.grad.shape == x.shape
            with torch.no_grad():
                features = model.eval().forward_features(x)
                assert features.shape[0] == 0 and features.shape[-1] == 64
                assert [f.shape[0] for f in model.forward_intermediates(x, intermediates_only=True)] == [0] * 4


def test_ceil_max_pool_is_ceil_mode_max_pooling():
    from pale.models.pale_transformer import CeilMaxPool2d

    pool, reference = CeilMaxPool2d(), torch.nn.MaxPool2d(2, ceil_mode=True)
    for size in ((7, 7), (8, 9), (1, 2), (28, 28)):
        x = torch.randn(2, 3, *size, requires_grad=True)
        out = pool(x)
        assert out.shape[-2:] == ((size[0] + 1) // 2, (size[1] + 1) // 2)
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
        grad, = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(grad, torch.autograd.grad(reference(x).sum(), x)[0], rtol=0, atol=0)
