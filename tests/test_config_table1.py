"""The registered variants against Table 1 of the paper, and every attention mode's group size,
interlacing and (sequential) direction per block, read from the built modules."""
import functools

import pytest
import timm
import torch

import pale  # noqa: F401  (registers the models)
from pale.models.pale_transformer import PaleTransformer

# Table 1: C_i, H_i per stage; every variant has depths [2, 2, 16, 2], S_i = 7, R_i = 4,
# P_1 = 4 (7x7 stride-4 stem), P_2..4 = 2 (3x3 stride-2 merging).
TABLE1 = {
    "pale_tiny": dict(dims=(64, 128, 256, 512), heads=(2, 4, 8, 16)),
    "pale_small": dict(dims=(96, 192, 384, 768), heads=(2, 4, 8, 16)),
    "pale_base": dict(dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32)),
}
DEPTHS = (2, 2, 16, 2)


@functools.lru_cache(maxsize=None)
def variant(name: str) -> PaleTransformer:
    """A registered variant as built by ``timm.create_model`` (cached: Pale-B takes seconds)."""
    return timm.create_model(name)


def tiny(**kwargs) -> PaleTransformer:
    return timm.create_model("pale_tiny", **TINY, **kwargs)


def blocks(model):
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            yield i, j, block


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_dims_depths_mlp_ratio_and_merging_follow_table1(name):
    model = variant(name)
    dims = TABLE1[name]["dims"]
    assert tuple(len(s.blocks) for s in model.stages) == DEPTHS
    stem = model.stem.proj
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding) == \
        (3, dims[0], (7, 7), (4, 4), (2, 2))
    for i in range(1, 4):
        conv = model.stages[i].downsample.proj
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == \
            (dims[i - 1], dims[i], (3, 3), (2, 2), (1, 1))
    for i, j, block in blocks(model):
        sd = block.state_dict()
        assert tuple(sd["norm1.weight"].shape) == (dims[i],)
        assert tuple(sd["mlp.fc1.weight"].shape) == (4 * dims[i], dims[i]), f"stage {i} block {j}: MLP ratio 4"
        assert tuple(sd["mlp.fc2.weight"].shape) == (dims[i], 4 * dims[i])
        assert isinstance(block.mlp.act, torch.nn.GELU) and block.mlp.act.approximate == "none"
        assert tuple(sd["cpe.proj.weight"].shape) == (dims[i], 1, 3, 3)   # CPE: depthwise 3x3 (Eq. 6)
    assert model.head.fc.in_features == dims[3] and model.head.fc.out_features == 1000


@pytest.mark.parametrize("name", [
    "pale_tiny", "pale_small", "pale_base"])
def test_heads_follow_table1(name):
    model = variant(name)
    heads = tuple(model.stages[i].blocks[0].attn.num_heads for i in range(4))
    assert heads == TABLE1[name]["heads"]
    for i, j, block in blocks(model):
        assert block.attn.num_heads == TABLE1[name]["heads"][i], f"stage {i} block {j}"


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_every_block_uses_interlaced_pale_size_7(name):
    for i, j, block in blocks(variant(name)):
        assert block.attn.mode == "parallel"
        assert tuple(block.attn.group_size) == (7, 7) and block.attn.interlaced, f"stage {i} block {j}"


TINY = dict(embed_dims=(8, 16, 16, 16), depths=(1, 3, 2, 1), num_heads=(2, 2, 4, 4), num_classes=0)


@pytest.mark.parametrize("mode,group_size,interlaced", [
    ("parallel", [(3, 2), (5, 4), (2, 3), (1, 6)], True),
    ("sequential", [(3, 2), (5, 4), (2, 3), (1, 6)], True),
    ("vanilla", [(3, 2), (5, 4), (2, 3), (1, 6)], True),
    ("axial", [(1, 1)] * 4, True),                       # pale size 1, whatever pale_size says
    ("cross_shaped", [(4, 4), (5, 5), (6, 6), (2, 2)], False),   # its own stripe width, contiguous
])
def test_each_mode_builds_its_own_group_size_per_block(mode, group_size, interlaced):
    model = tiny(attn_mode=mode, pale_size=[(3, 2), (5, 4), (2, 3), (1, 6)],
                       stripe_width=[4, 5, 6, 2])
    for i, j, block in blocks(model):
        assert block.attn.mode == mode
        assert tuple(block.attn.group_size) == group_size[i], f"stage {i} block {j}"
        assert block.attn.interlaced is interlaced, f"stage {i} block {j}"


def test_sequential_blocks_alternate_row_and_column_in_every_stage():
    model = tiny(attn_mode="sequential", pale_size=3)
    for i, j, block in blocks(model):
        assert block.attn.direction == ("row" if j % 2 == 0 else "column"), f"stage {i} block {j}"
    # Only the sequential mode has a direction.
    for i, j, block in blocks(tiny(attn_mode="parallel")):
        assert block.attn.direction is None
