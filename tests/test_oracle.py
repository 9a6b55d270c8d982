"""The model against tests/oracle.py, an independent float64 reference written from the paper, for
every attention mode and position encoding: one PS-attention layer, one block, and a whole tiny
network end to end (logits and the four stage maps), in train and eval mode, at odd sizes that
need padding. The oracle reads the model only through ``state_dict`` key names."""
import pytest
import torch

import oracle
from pale.models.pale_transformer import PaleTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10
MODES = ("parallel", "sequential", "vanilla", "axial", "cross_shaped")
# Pale size (3, 2) pads rows and columns differently; the stripe width (4) is neither, so a mode
# built with another mode's group size gives other groups. Depth 2 in stage 2 exercises the
# sequential mode's row/column alternation; 4 heads in stages 3-4 give two heads per branch.
TINY = dict(embed_dims=(8, 16, 16, 16), depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4), pale_size=(3, 2),
            stripe_width=4, num_classes=3, drop_path_rate=0.0)
IMAGE_SIZES = ((45, 37), (53, 61))   # stage maps 12x10/6x5/3x3/2x2 and 14x16/7x8/4x4/2x2 after padding
MAP_SIZES = ((11, 9), (7, 10))       # for single layers and blocks

MODE_PARAMS = list(MODES)


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights AND statistics: default init (unit norms, zero biases, running stats 0 / 1) would
    hide bugs in the norms and in BatchNorm's use of its running statistics."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "bn.weight")):
                t.copy_(1 + 0.3 * torch.randn_like(t))
            else:
                t.copy_(0.4 * torch.randn_like(t))
    return model


def build(mode: str, pos_embed: str = "cpe", img_size=IMAGE_SIZES[0]) -> PaleTransformer:
    model = PaleTransformer(**TINY, attn_mode=mode, pos_embed=pos_embed, img_size=img_size)
    return randomize_(model.double())


def net_config(mode: str, pos_embed: str = "cpe", img_size=IMAGE_SIZES[0]) -> oracle.NetConfig:
    return oracle.NetConfig(depths=TINY["depths"], num_heads=TINY["num_heads"], mode=mode,
                            pale_size=TINY["pale_size"], stripe_width=TINY["stripe_width"],
                            pos_embed=pos_embed, img_size=img_size)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype == torch.float64
    return (a - b).abs().max().item()


# (stage, block): stage 1 block 1 is a column block in the sequential mode, stage 2 block 0 a row
# block with 4 heads.
LAYERS = ((1, 1), (2, 0))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("size", MAP_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("stage,block", LAYERS, ids=lambda v: str(v))
@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_layer_and_block_match_the_oracle(mode, stage, block, size, training):
    model = build(mode).train(training)
    prefix = f"stages.{stage}.blocks.{block}"
    params = oracle.as_float64(model.state_dict())
    dim = TINY["embed_dims"][stage]
    cfg = oracle.AttnConfig(TINY["num_heads"][stage], mode, TINY["pale_size"], TINY["stripe_width"], block_index=block)
    x = torch.randn(2, *size, dim, dtype=torch.float64)

    with torch.no_grad():
        layer_out = model.get_submodule(prefix + ".attn")(x)
        block_out = model.get_submodule(prefix)(x)
    expected_layer = oracle.ps_attention(x, oracle.sub(params, prefix + ".attn"), cfg, training)
    expected_block = oracle.pale_block(x, oracle.sub(params, prefix), cfg, training)
    assert max_diff(layer_out, expected_layer) < TOL
    assert max_diff(block_out, expected_block) < TOL


def _network_matches(model, cfg, size, training):
    model.train(training)
    params = oracle.as_float64(model.state_dict())
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        logits = model(images)
        maps = model.forward_intermediates(images, intermediates_only=True)
    expected_logits, expected_maps = oracle.pale_transformer(images, params, cfg, training)
    assert len(maps) == 4
    assert max_diff(logits, expected_logits) < TOL
    for got, want in zip(maps, expected_maps):
        assert max_diff(got, want.permute(0, 3, 1, 2)) < TOL


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_network_matches_the_oracle(mode, size, training):
    _network_matches(build(mode), net_config(mode), size, training)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_network_without_position_encoding_matches_the_oracle(size, training):
    _network_matches(build("parallel", "none"), net_config("parallel", "none"), size, training)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_network_with_per_stage_ape_matches_the_oracle(size, training):
    # Tables learned at the first size: the second size exercises their resampling.
    model = build("parallel", "ape", img_size=IMAGE_SIZES[0])
    _network_matches(model, net_config("parallel", "ape", IMAGE_SIZES[0]), size, training)


def test_forward_intermediates_options_take_the_same_maps():
    """The maps compared with the oracle above come with timm's default options; the others select,
    normalise, lay out and stop on those same maps; ``pre_logits`` gives the pooled final map."""
    model = build("parallel").eval()
    images = torch.randn(1, 3, *IMAGE_SIZES[0], dtype=torch.float64)
    with torch.no_grad():
        features = model.forward_features(images)
        final, maps = model.forward_intermediates(images)
        assert len(maps) == 4 and torch.equal(final, features)
        nhwc = model.forward_intermediates(images, output_fmt="NHWC", intermediates_only=True)
        assert all(torch.equal(a, b.permute(0, 3, 1, 2)) for a, b in zip(maps, nhwc))
        normed = model.forward_intermediates(images, norm=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(maps[:3], normed[:3]))
        assert torch.equal(normed[3], features.permute(0, 3, 1, 2))
        final, two = model.forward_intermediates(images, indices=[0, 1])   # runs on to the end
        assert len(two) == 2 and torch.equal(two[1], maps[1]) and torch.equal(final, features)
        final, two = model.forward_intermediates(images, indices=[0, 1], stop_early=True)
        assert len(two) == 2 and torch.equal(final, maps[1].permute(0, 2, 3, 1))
        pooled = model.forward_head(features, pre_logits=True)   # the head's input: the average token
        torch.testing.assert_close(pooled, features.mean((1, 2)), rtol=0, atol=1e-12)


def test_a_half_precision_table_is_resampled_in_float32():
    """The tables' resampling keeps their dtype; PyTorch's antialiased bicubic has no CPU kernel for
    bfloat16, so a bfloat16 table is resized in float32."""
    from pale.models.pale_transformer import resample_pos_embed
    table = torch.randn(1, 5, 4, 8).to(torch.bfloat16)
    out = resample_pos_embed(table, (7, 3))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 7, 3, 8)
    assert torch.equal(out, resample_pos_embed(table.float(), (7, 3)).to(torch.bfloat16))


def test_the_oracle_sees_a_changed_weight():
    """The comparison is not vacuous: one perturbed weight moves the model away from the oracle."""
    model = build("parallel")
    params = oracle.as_float64(model.state_dict())
    params["stages.2.blocks.0.attn.k.dw.weight"][0, 0, 1, 1] += 1e-3
    images = torch.randn(1, 3, *IMAGE_SIZES[0], dtype=torch.float64)
    with torch.no_grad():
        logits = model.eval()(images)
    assert max_diff(logits, oracle.pale_transformer(images, params, net_config("parallel"), False)[0]) > 1e-8


def test_oracle_groups_follow_the_definitions():
    """The oracle's own groups, checked by hand on small cases (interlaced as in Eq. 1)."""
    assert oracle.interlaced_rows(7, 3) == [[0, 3, 6], [1, 4], [2, 5]]   # padded to 9 rows, N_r = 3
    assert oracle.interlaced_rows(5, 1) == [[0], [1], [2], [3], [4]]
    assert oracle.contiguous_rows(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    # 3x2 map, pale size (2, 1): N = max(2, 2) = 2; pale 0 = rows {0, 2} + column 0.
    assert oracle.pales(3, 2, (2, 1))[0] == [0, 1, 2, 4, 5]
    assert oracle.pales(3, 2, (2, 1))[1] == [1, 2, 3, 5]   # row 1 + column 1
