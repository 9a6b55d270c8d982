"""Position encodings (Table 9): APE, one learned table per stage at the model's img_size and resized
for other inputs; CPE in every block; or none; and what each costs in parameters."""
import pytest
import torch
from timm.layers import resample_abs_pos_embed_nhwc

from pale.complexity import PaleConfig, analytic_cost
from pale.models.pale_transformer import PaleTransformer

TINY = dict(embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 2), num_heads=(2, 2, 4, 4), num_classes=5)


def _added_per_stage(model, x):
    """What the model adds in each stage between patch merging and the first block:
    ``[(merged map, first block's input)]`` per stage, and the logits."""
    seen = {}
    hooks = []
    for i, stage in enumerate(model.stages):
        hooks.append(stage.downsample.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("merged", i), o)))
        hooks.append(stage.blocks.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("blocks", i), a[0])))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return [(seen["merged", i], seen["blocks", i]) for i in range(len(model.stages))], out


def test_ape_is_one_table_per_stage_at_the_training_size():
    model = PaleTransformer(**TINY, pos_embed="ape", img_size=(64, 96)).eval()
    tables = [stage.pos_embed for stage in model.stages]
    # each stage's grid for a 64x96 image: the stem's 16x24, then halved per stage
    assert [tuple(t.shape) for t in tables] == [(1, 16, 24, 16), (1, 8, 12, 32), (1, 4, 6, 32), (1, 2, 3, 64)]
    assert all(t.requires_grad and t.abs().sum() > 0 for t in tables)
    pairs, out = _added_per_stage(model, torch.randn(2, 3, 64, 96))
    for (merged, block_in), table in zip(pairs, tables):   # added as it is, no resizing
        torch.testing.assert_close(block_in - merged, table.expand_as(merged), atol=1e-6, rtol=0)
    assert out.shape == (2, 5)
    assert model.no_weight_decay() == {f"stages.{i}.pos_embed" for i in range(4)}


@pytest.mark.parametrize("size,grids", [((37, 201), [(9, 50), (5, 25), (3, 13), (2, 7)]), ((5, 5), [(1, 1)] * 4)])
def test_ape_is_interpolated_for_other_sizes(size, grids):
    model = PaleTransformer(**TINY, pos_embed="ape", img_size=64).eval()
    pairs, out = _added_per_stage(model, torch.randn(2, 3, *size))
    assert out.shape == (2, 5)
    for (merged, block_in), stage, grid in zip(pairs, model.stages, grids):
        assert tuple(merged.shape[1:3]) == grid
        expected = resample_abs_pos_embed_nhwc(stage.pos_embed, list(grid))
        torch.testing.assert_close(block_in - merged, expected.expand_as(merged), atol=1e-6, rtol=1e-6)


def test_set_input_size_resamples_each_table_to_the_new_grid():
    import timm

    model = PaleTransformer(**TINY, pos_embed="ape", img_size=64).eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        before = model(x)
    model.set_input_size((96, 80))
    assert model.img_size == (96, 80)
    assert [tuple(s.pos_embed.shape[1:3]) for s in model.stages] == [(24, 20), (12, 10), (6, 5), (3, 3)]
    assert all(s.pos_embed.requires_grad for s in model.stages)
    assert model.no_weight_decay() == {f"stages.{i}.pos_embed" for i in range(4)}
    with torch.no_grad():
        assert torch.equal(model(x), before)   # resampled once instead of in every forward
    # a model built at the new size has the same shapes
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in PaleTransformer(**TINY, pos_embed="ape", img_size=(96, 80)).state_dict().items()}
    if hasattr(timm.models, "get_model_args"):   # newer timm: what save_for_hf records to rebuild it
        built = timm.create_model("pale_tiny", pos_embed="ape", img_size=64, device="meta")
        built.set_input_size(128)
        assert timm.models.get_model_args(built)["img_size"] == (128, 128)


def test_ape_resizing_keeps_a_constant_table_constant_and_passes_gradients():
    model = PaleTransformer(**TINY, pos_embed="ape", img_size=64)
    with torch.no_grad():
        for stage in model.stages:
            stage.pos_embed.fill_(0.25)
    pairs, _ = _added_per_stage(model.eval(), torch.randn(1, 3, 44, 36))
    for merged, block_in in pairs:
        torch.testing.assert_close(block_in - merged, torch.full_like(merged, 0.25), atol=1e-5, rtol=0)
    # Trained at another size, every table still receives gradients through the interpolation.
    model.train()
    model(torch.randn(2, 3, 44, 36)).sum().backward()
    assert all(s.pos_embed.grad is not None and s.pos_embed.grad.abs().sum() > 0 for s in model.stages)


def test_checkpoint_at_another_size_loads_with_each_table_resized():
    from pale.models.pale_transformer import checkpoint_filter_fn
    small = PaleTransformer(**TINY, pos_embed="ape", img_size=64)
    large = PaleTransformer(**TINY, pos_embed="ape", img_size=(96, 128))
    state = checkpoint_filter_fn({"model": small.state_dict()}, large)
    large.load_state_dict(state)
    for i, stage in enumerate(large.stages):
        expected = resample_abs_pos_embed_nhwc(small.stages[i].pos_embed, list(stage.pos_embed.shape[1:3]))
        torch.testing.assert_close(stage.pos_embed, expected)


def test_none_and_cpe_add_nothing_between_merging_and_blocks():
    for pos_embed in ("none", "cpe"):
        model = PaleTransformer(**TINY, pos_embed=pos_embed).eval()
        assert all(stage.pos_embed is None for stage in model.stages) and model.no_weight_decay() == set()
        pairs, _ = _added_per_stage(model, torch.randn(1, 3, 64, 64))
        assert all(torch.equal(merged, block_in) for merged, block_in in pairs)


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
    grids, side = [], ((h + 4 - 7) // 4 + 1, (w + 4 - 7) // 4 + 1)   # stem, then 3x3 stride-2 merging
    for _ in range(4):
        grids.append(side)
        side = tuple((s - 1) // 2 + 1 for s in side)
    assert counts["ape"] - counts["none"] == sum(gh * gw * c for (gh, gw), c in zip(grids, TINY["embed_dims"]))
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
