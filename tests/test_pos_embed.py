"""Position encodings (Table 9): APE learned at the pretraining size and resized for other inputs,
CPE in every block, or none; and what each costs in parameters."""
import pytest
import torch
from timm.layers import resample_abs_pos_embed_nhwc

from pale.complexity import PaleConfig, analytic_cost
from pale.models.pale_transformer import PaleTransformer

TINY = dict(embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 2), num_heads=(2, 2, 4, 4), num_classes=5)


def _added_after_stem(model, x):
    """What the model adds to the stem's output before stage 1: ``(stem output, stage-1 input)``."""
    seen = {}
    hooks = [model.stem.register_forward_hook(lambda m, i, o: seen.__setitem__("stem", o)),
             model.stages[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("stage", i[0]))]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen["stem"], seen["stage"], out


def test_ape_is_learned_at_the_pretraining_size():
    model = PaleTransformer(**TINY, pos_embed="ape", img_size=(64, 96)).eval()
    assert tuple(model.pos_embed.shape) == (1, 16, 24, 16)   # the stem's grid of a 64x96 image
    assert model.pos_embed.requires_grad and model.pos_embed.abs().sum() > 0
    stem, stage_in, out = _added_after_stem(model, torch.randn(2, 3, 64, 96))
    # At the pretraining size the learned table is added as it is, no resizing.
    torch.testing.assert_close(stage_in - stem, model.pos_embed.expand_as(stem), atol=1e-6, rtol=0)
    assert out.shape == (2, 5)


@pytest.mark.parametrize("size,grid", [((37, 201), (9, 50)), ((5, 5), (1, 1))])
def test_ape_is_interpolated_for_other_sizes(size, grid):
    model = PaleTransformer(**TINY, pos_embed="ape", img_size=64).eval()
    stem, stage_in, out = _added_after_stem(model, torch.randn(2, 3, *size))
    assert tuple(stem.shape[1:3]) == grid and out.shape == (2, 5)
    expected = resample_abs_pos_embed_nhwc(model.pos_embed, list(grid))
    assert expected.shape == (1, *grid, 16)
    torch.testing.assert_close(stage_in - stem, expected.expand_as(stem), atol=1e-6, rtol=1e-6)


def test_ape_resizing_keeps_a_constant_table_constant_and_passes_gradients():
    model = PaleTransformer(**TINY, pos_embed="ape", img_size=64)
    with torch.no_grad():
        model.pos_embed.fill_(0.25)
    stem, stage_in, _ = _added_after_stem(model.eval(), torch.randn(1, 3, 44, 36))
    torch.testing.assert_close(stage_in - stem, torch.full_like(stem, 0.25), atol=1e-5, rtol=0)
    # Trained at another size, the table still receives gradients through the interpolation.
    model.train()
    model(torch.randn(2, 3, 44, 36)).sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0


def test_none_and_cpe_add_nothing_after_the_stem():
    for pos_embed in ("none", "cpe"):
        model = PaleTransformer(**TINY, pos_embed=pos_embed).eval()
        assert model.pos_embed is None
        stem, stage_in, _ = _added_after_stem(model, torch.randn(1, 3, 64, 64))
        assert torch.equal(stem, stage_in)


def test_cpe_is_in_every_block_and_only_with_cpe():
    def cpe_convs(model):
        return [n for n, _ in model.named_modules() if n.endswith(".cpe")]
    assert len(cpe_convs(PaleTransformer(**TINY, pos_embed="cpe"))) == sum(TINY["depths"])
    assert cpe_convs(PaleTransformer(**TINY, pos_embed="ape")) == []
    assert cpe_convs(PaleTransformer(**TINY, pos_embed="none")) == []


@pytest.mark.parametrize("img_size", [224, (64, 96)])
def test_parameter_counts_of_the_encodings(img_size):
    counts = {p: sum(t.numel() for t in PaleTransformer(**TINY, pos_embed=p, img_size=img_size).parameters())
              for p in ("none", "ape", "cpe")}
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    stem_grid = ((h + 4 - 7) // 4 + 1) * ((w + 4 - 7) // 4 + 1)
    assert counts["ape"] - counts["none"] == stem_grid * TINY["embed_dims"][0]
    # A depthwise 3x3 conv with bias per block: 10 c.
    assert counts["cpe"] - counts["none"] == sum(10 * c * d for c, d in zip(TINY["embed_dims"], TINY["depths"]))
    for p, n in counts.items():
        assert analytic_cost(PaleConfig.from_kwargs(**TINY, pos_embed=p, img_size=img_size), (64, 64)).params == n


@pytest.mark.parametrize("kwargs,match", [
    (dict(pos_embed="ape", img_size=0), "img_size must be >= 1"),
    (dict(pos_embed="ape", img_size=(64, 64, 3)), "img_size must be an int or a pair"),
    (dict(pos_embed="APE"), "unknown position encoding"),
])
def test_bad_position_encoding_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PaleTransformer(**TINY, **kwargs)
    with pytest.raises(ValueError, match=match):
        analytic_cost(PaleConfig.from_kwargs(**TINY, **kwargs), (64, 64))
