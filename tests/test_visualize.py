"""Receptive-field pictures against the reference group definitions, and attention overlays."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import pale  # noqa: F401
from pale import create_attention
from pale.checkpoint import create_model_from_file, save_checkpoint
from pale.cli import main
from pale.visualize import (RF_COLORS, receptive_field, stage_attention, token_attention)
from reference import mode_masks

MODES = ("parallel", "sequential", "vanilla", "axial", "cross_shaped")
# (map size, pale size / stripe width, reference token): odd sizes, padding, tokens on the border.
CASES = [((12, 12), (3, 3), (6, 6)), ((9, 5), (3, 2), (8, 0)), ((8, 10), (3, 3), (3, 7))]


def _layer(mode, group, direction=None):
    return create_attention(8, 2, pale_size=group, mode=mode, stripe_width=group[0] if group[0] == group[1] else 3,
                            direction=direction)


def _expected(layer, size, token):
    """Ground truth from tests/reference.py: branch name -> (H, W) bool mask of the token's row."""
    h, w = size
    masks = mode_masks(layer.mode, h, w, layer.group_size, layer.direction or "row")
    t = token[0] * w + token[1]
    if isinstance(masks, tuple):
        return {"row": masks[0][t].view(h, w).numpy(), "column": masks[1][t].view(h, w).numpy()}
    return {"all": masks[t].view(h, w).numpy()}


@pytest.mark.parametrize("size,group,token", CASES)
@pytest.mark.parametrize("mode,direction", [(m, None) for m in MODES if m != "sequential"]
                         + [("sequential", "row"), ("sequential", "column")])
def test_receptive_field_is_exactly_the_modes_group(mode, direction, size, group, token):
    layer = _layer(mode, group, direction)
    field = receptive_field(layer, size, token)
    expected = _expected(layer, size, token)
    assert field.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(field[name], expected[name], err_msg=f"{mode} {name} {size} {token}")


def test_parallel_marks_the_pale_and_differs_from_the_other_modes():
    size, token, s = (12, 12), (6, 6), 3
    fields = {m: receptive_field(_layer(m, (s, s)), size, token) for m in MODES}
    union = {m: np.logical_or.reduce(list(f.values())) for m, f in fields.items()}
    # The pale: s interlaced rows (rows = 6 mod 4) and s interlaced columns, s*w + s*h - s*s tokens.
    rows, cols = np.arange(12) % 4 == 2, np.arange(12) % 4 == 2
    np.testing.assert_array_equal(union["parallel"], rows[:, None] | cols[None, :])
    assert union["parallel"].sum() == s * 12 + s * 12 - s * s
    # vanilla covers the same pale with every channel; parallel splits it between two branches.
    np.testing.assert_array_equal(union["vanilla"], union["parallel"])
    assert not np.array_equal(fields["parallel"]["row"], fields["parallel"]["column"])
    assert union["sequential"].sum() == s * 12 and (union["sequential"] <= union["parallel"]).all()
    assert union["axial"].sum() == 12 + 12 - 1 and (union["axial"] <= union["parallel"]).all()
    # CSWin stripes are contiguous: rows 6..8, which the interlaced pale does not hold.
    assert union["cross_shaped"][7, 0] and not union["parallel"][7, 0]


def _layout_size(panels, h, w, cell=16):
    """The picture's size as docs/deploy.md states it: 10 px margins, an 18 px title strip, a 22 px
    legend, panels of h x w cells of `cell` px plus a closing grid line, 20 px apart."""
    return 2 * 10 + 18 + h * cell + 1 + 22, 2 * 10 + panels * (w * cell + 1) + (panels - 1) * 20


def test_receptive_field_png_marks_the_expected_pixels(tmp_path, capsys):
    out = tmp_path / "rf.png"
    assert main(["visualize", "receptive-field", "--size", "9", "11", "--token", "4", "2", "-o", str(out)]) == 0
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[:2] == _layout_size(5, 9, 11)
    colors = {name: np.array(RF_COLORS[name]) for name in ("row", "column", "both", "all", "empty", "token")}
    for panel, mode in enumerate(MODES):
        layer = _layer(mode, (3, 3), "row" if mode == "sequential" else None)
        expected = _expected(layer, (9, 11), (4, 2))
        py, px = 10 + 18, 10 + panel * (11 * 16 + 1 + 20)
        for y in range(9):
            for x in range(11):
                hit = {n for n, m in expected.items() if m[y, x]}
                name = "empty" if not hit else "both" if len(hit) == 2 else hit.pop()
                pixel = img[py + y * 16 + 2, px + x * 16 + 2]
                np.testing.assert_array_equal(pixel, colors[name], err_msg=f"{mode} cell {(y, x)}")
        # the reference token's red dot at its cell's centre
        np.testing.assert_array_equal(img[py + 4 * 16 + 8, px + 2 * 16 + 8], colors["token"])


def test_single_mode_picture(tmp_path):
    out = tmp_path / "axial.png"
    assert main(["visualize", "receptive-field", "--mode", "axial", "--size", "5", "7", "-o", str(out)]) == 0
    img = np.asarray(Image.open(out).convert("RGB"))
    # One narrow panel: the picture is widened (not the panel) so that the legend fits.
    height, width = _layout_size(1, 5, 7)
    assert img.shape[0] == height and img.shape[1] > width
    expected = _expected(_layer("axial", (1, 1)), (5, 7), (2, 3))
    for y in range(5):
        for x in range(7):
            hit = {n for n, m in expected.items() if m[y, x]}
            name = "empty" if not hit else "both" if len(hit) == 2 else hit.pop()
            np.testing.assert_array_equal(img[28 + y * 16 + 2, 10 + x * 16 + 2], RF_COLORS[name])


@pytest.mark.parametrize("mode", MODES)
def test_token_attention_weights_reproduce_the_layer_output(mode):
    torch.manual_seed(0)
    layer = create_attention(8, 4, pale_size=(3, 2), mode=mode, stripe_width=2).double().eval()
    x = torch.randn(1, 7, 9, 8, dtype=torch.float64)
    token = (5, 3)
    weights = token_attention(layer, x, token)                       # (heads, H, W)
    assert weights.shape == (4, 7, 9)
    torch.testing.assert_close(weights.sum((1, 2)), torch.ones(4, dtype=torch.float64))
    # Recombine the values with these weights: the layer's own output at the token.
    v = layer.v(x)[0].reshape(7 * 9, 4, 2)
    heads_out = torch.einsum("hn,nhd->hd", weights.reshape(4, -1), v).reshape(-1)
    with torch.no_grad():
        torch.testing.assert_close(layer.proj(heads_out), layer(x)[0, token[0], token[1]])
    # Support: the reference group definition.
    expected = _expected(layer, (7, 9), token)
    support = (weights > 0).numpy()
    branches = list(expected.values())
    per_branch = 4 // len(branches)
    for i, mask in enumerate(branches):
        assert (support[i * per_branch:(i + 1) * per_branch] == mask).all()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    kw = dict(embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 1), num_heads=(2, 2, 2, 2), num_classes=3)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, timm.create_model("pale_tiny", **kw), "pale_tiny", kw, class_names=["a", "b", "c"])
    return path


def test_stage_attention_maps_the_token_to_every_stage(checkpoint):
    model, _ = create_model_from_file(checkpoint)
    maps = stage_attention(model, torch.randn(1, 3, 96, 160), token=(50, 120), block=-1)
    assert [m.stage for m in maps] == [0, 1, 2, 3] and [m.block for m in maps] == [0, 1, 0, 0]
    grids = [m.weights.shape for m in maps]
    assert grids == [(24, 40), (12, 20), (6, 10), (3, 5)]
    assert [m.grid_token for m in maps] == [(12, 30), (6, 15), (3, 7), (1, 3)]
    for m in maps:
        assert m.weights.sum() == pytest.approx(1.0, abs=1e-5)
        assert m.weights[m.grid_token] > 0


def test_attention_overlay_png(checkpoint, tmp_path, capsys):
    import skimage.data

    photo = tmp_path / "chelsea.jpg"
    Image.fromarray(skimage.data.chelsea()).save(photo)               # 300 x 451
    out = tmp_path / "att.png"
    assert main(["visualize", "attention", str(photo), "-c", str(checkpoint), "--token", "150", "200",
                 "--short-side", "96", "-o", str(out)]) == 0
    w, h = Image.open(out).size
    assert w == 5 * 300 and abs(h - (3.0 * 300 / 451 + 0.6) * 100) <= 1  # input + 4 stages, 3-inch panels
    assert "stage 4" in capsys.readouterr().out
    assert main(["visualize", "attention", str(photo), "-c", str(checkpoint), "--token", "300", "0",
                 "-o", str(out)]) == 1
    assert "outside the 300x451 image" in capsys.readouterr().err


def test_the_output_suffix_chooses_the_image_format_and_an_unknown_one_is_refused(checkpoint, tmp_path, capsys):
    # -o rf.txt used to get a PNG under that name, and the attention figure a matplotlib traceback
    assert main(["visualize", "receptive-field", "--size", "9", "11", "-o", str(tmp_path / "rf.jpg")]) == 0
    assert Image.open(tmp_path / "rf.jpg").format == "JPEG"
    assert main(["visualize", "receptive-field", "--size", "9", "11", "-o", str(tmp_path / "rf.txt")]) == 1
    assert "cannot write an image to" in capsys.readouterr().err
    digit = tmp_path / "digit.png"
    Image.fromarray((np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)).save(digit)
    assert main(["visualize", "attention", str(digit), "-c", str(checkpoint), "--token", "3", "3",
                 "-o", str(tmp_path / "att.txt")]) == 1
    err = capsys.readouterr().err
    assert "cannot write a figure to" in err and ".txt is not a format matplotlib writes" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digit.png", "rf.jpg"]  # nothing half-written


def test_receptive_field_refuses_maps_and_pictures_too_large_to_draw(tmp_path, capsys):
    # --size 500 500 ran for minutes; --cell 1000 wrote a 60105x12061 px PNG
    out = tmp_path / "rf.png"
    assert main(["visualize", "receptive-field", "--size", "500", "500", "-o", str(out)]) == 1
    assert "--size 500 500: at most 128 tokens per side" in capsys.readouterr().err
    assert main(["visualize", "receptive-field", "--cell", "1000", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--cell 1000 makes a 60105x12061 px picture (at most 16384 per side); use --cell 271 or less" in err
    assert not out.exists()
    assert main(["visualize", "receptive-field", "--cell", "271", "--size", "3", "12", "-o", str(out)]) == 0
    assert max(Image.open(out).size) <= 16384
