"""Pictures of what PS-attention looks at, computed from the modules themselves.

* :func:`receptive_field`: which tokens one attention layer's output at a reference token depends
  on, read off the gradient of that output with respect to the layer's *projected values* ``v``.
  ``d out_i / d v_j`` is the attention weight ``p_ij`` (times the output projection), so it is
  non-zero exactly where the token attends; taking it with respect to ``v`` rather than the layer's
  input leaves out the 3x3 depthwise convolution of the q/k/v projections, which would widen the
  footprint by one token on every side. :func:`render_receptive_fields` draws every mode side by
  side in the manner of the paper's Figure 1 (shaded region, red reference token).
* :func:`token_attention` / :func:`stage_attention`: the attention weights of one query token, as
  the layer itself computes them: the layer runs its explicit ``softmax(q k^T) v`` path
  (``fused_attn = False``) and keeps the weights (``keep_attn_weights``);
  :func:`render_attention_overlay` overlays their head average for every stage on the image.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .files import PathLike, atomic_savefig
from .errors import InputError

__all__ = ["TWO_BRANCH_MODES", "branch_channels", "receptive_field", "RFLayout",
           "RF_COLORS", "render_receptive_fields", "token_attention", "StageAttention",
           "stage_attention", "render_attention_overlay"]

TWO_BRANCH_MODES = ("parallel", "axial", "cross_shaped")

# Figure colours (RGB): a token reached by the row branch, by the column branch, by both, by the
# single branch of sequential / vanilla ("all"), not reached, grid lines, and the reference token.
RF_COLORS: Dict[str, Tuple[int, int, int]] = dict(
    row=(255, 183, 77), column=(100, 181, 246), both=(171, 71, 188), all=(244, 143, 177),
    empty=(245, 245, 245), grid=(190, 190, 190), token=(211, 0, 0), background=(255, 255, 255),
    text=(0, 0, 0))


def branch_channels(layer: nn.Module) -> Dict[str, Tuple[slice, int]]:
    """The layer's attention branches: name -> (channel slice, heads).

    Two-branch modes give the first ``C/2`` channels and heads to rows and the rest to columns
    (docs/design.md); ``sequential`` and ``vanilla`` use every channel in one branch (``'all'``).
    """
    c, heads = layer.dim, layer.num_heads
    if layer.mode in TWO_BRANCH_MODES:
        return {"row": (slice(0, c // 2), heads // 2), "column": (slice(c // 2, c), heads // 2)}
    return {"all": (slice(0, c), heads)}


def _check_token(token: Sequence[int], h: int, w: int, what: str = "map") -> Tuple[int, int]:
    ty, tx = int(token[0]), int(token[1])
    if not (0 <= ty < h and 0 <= tx < w):
        raise InputError(f"token ({ty}, {tx}) is outside the {h}x{w} {what}")
    return ty, tx


# ---- receptive field ---------------------------------------------------------------------------

def receptive_field(layer: nn.Module, size: Tuple[int, int], token: Tuple[int, int], seed: int = 0) -> Dict[str, np.ndarray]:
    """Which tokens ``layer``'s output at ``token`` depends on, per branch, on an ``H x W`` map.

    Runs the layer (in float64, eval mode) on a random input, replaces the output of ``layer.v``
    by a leaf tensor (a forward hook), back-propagates a random projection of the output at
    ``token`` and marks the tokens whose projected values get a non-zero gradient, separately for
    each branch's channels (:func:`branch_channels`).

    Returns:
        branch name -> ``(H, W)`` bool array.
    """
    h, w = size
    ty, tx = _check_token(token, h, w)
    layer = layer.double().eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, h, w, layer.dim, generator=gen, dtype=torch.float64)
    captured: Dict[str, Tensor] = {}

    def leaf(module: nn.Module, args: Tuple[Tensor, ...], out: Tensor) -> Tensor:
        captured["v"] = out.detach().requires_grad_(True)
        return captured["v"]

    hook = layer.v.register_forward_hook(leaf)
    try:
        out = layer(x)
    finally:
        hook.remove()
    probe = torch.randn(layer.dim, generator=gen, dtype=torch.float64)
    (out[0, ty, tx] * probe).sum().backward()
    grad = captured["v"].grad[0].abs()                          # (H, W, C)
    return {name: (grad[..., channels] > 0).any(-1).numpy() for name, (channels, _) in branch_channels(layer).items()}


@dataclass(frozen=True)
class RFLayout:
    """Pixel geometry of :func:`render_receptive_fields`: panels of ``h x w`` cells, ``cell`` pixels
    each (the last row and column of a cell are a grid line), side by side under a title strip,
    and a legend line below; the image is widened to ``min_width`` when the legend needs it."""

    panels: int
    h: int
    w: int
    cell: int = 16
    margin: int = 10
    gap: int = 20
    title: int = 18
    legend: int = 22
    min_width: int = 0

    @property
    def panel_size(self) -> Tuple[int, int]:
        return self.h * self.cell + 1, self.w * self.cell + 1

    @property
    def size(self) -> Tuple[int, int]:
        """Image (height, width) in pixels."""
        ph, pw = self.panel_size
        return (2 * self.margin + self.title + ph + self.legend,
                max(2 * self.margin + self.panels * pw + (self.panels - 1) * self.gap, self.min_width))

    def panel_origin(self, panel: int) -> Tuple[int, int]:
        return self.margin + self.title, self.margin + panel * (self.panel_size[1] + self.gap)

    def cell_origin(self, panel: int, y: int, x: int) -> Tuple[int, int]:
        """Top-left pixel inside cell ``(y, x)`` of ``panel`` (after the grid line)."""
        py, px = self.panel_origin(panel)
        return py + y * self.cell + 1, px + x * self.cell + 1


def _cell_color(branches: Dict[str, np.ndarray], y: int, x: int) -> Tuple[int, int, int]:
    hit = {name for name, m in branches.items() if m[y, x]}
    if not hit:
        return RF_COLORS["empty"]
    if hit == {"row", "column"}:
        return RF_COLORS["both"]
    return RF_COLORS[hit.pop()]


def render_receptive_fields(fields: Dict[str, Dict[str, np.ndarray]], token: Tuple[int, int],
                            cell: int = 16) -> np.ndarray:
    """Draw one panel per mode (title, grid of tokens coloured by branch, red reference token) and
    a colour legend. Returns an ``(H, W, 3)`` uint8 image laid out by :class:`RFLayout`."""
    from PIL import Image, ImageDraw

    names = list(fields)
    h, w = next(iter(fields[names[0]].values())).shape
    branches = {b for f in fields.values() for b in f}
    legend = [(k, label) for k, label in (("row", "row branch"), ("column", "column branch"),
                                          ("both", "both branches")) if "row" in branches]
    legend += [("all", "all channels")] if "all" in branches else []
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    steps = [14 + int(measure.textlength(label)) + 16 for _, label in legend]
    layout = RFLayout(len(names), h, w, cell)
    layout = RFLayout(len(names), h, w, cell, min_width=2 * layout.margin + sum(steps) - 16)
    img = Image.new("RGB", layout.size[::-1], RF_COLORS["background"])
    draw = ImageDraw.Draw(img)
    ty, tx = token
    for i, name in enumerate(names):
        py, px = layout.panel_origin(i)
        ph, pw = layout.panel_size
        draw.rectangle([px, py, px + pw - 1, py + ph - 1], fill=RF_COLORS["grid"])
        for y in range(h):
            for x in range(w):
                oy, ox = layout.cell_origin(i, y, x)
                draw.rectangle([ox, oy, ox + cell - 2, oy + cell - 2], fill=_cell_color(fields[name], y, x))
        cy, cx = layout.cell_origin(i, ty, tx)
        r = max(cell // 4, 1)
        mid_y, mid_x = cy + (cell - 1) // 2, cx + (cell - 1) // 2
        draw.ellipse([mid_x - r, mid_y - r, mid_x + r, mid_y + r], fill=RF_COLORS["token"])
        draw.text((px, layout.margin), name, fill=RF_COLORS["text"])
    legend_y = layout.size[0] - layout.margin - layout.legend + 6
    x0 = layout.margin
    for (key, label), step in zip(legend, steps):
        draw.rectangle([x0, legend_y, x0 + 10, legend_y + 10], fill=RF_COLORS[key])
        draw.text((x0 + 14, legend_y), label, fill=RF_COLORS["text"])
        x0 += step
    return np.asarray(img)


# ---- attention weights of a trained model ------------------------------------------------------

@contextlib.contextmanager
def keeping_attention(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Inside the block, ``layers`` (attention layers) run their explicit path and keep their weights."""
    saved = [(layer.fused_attn, layer.keep_attn_weights) for layer in layers]
    for layer in layers:
        layer.fused_attn, layer.keep_attn_weights, layer.attn_weights = False, True, None
    try:
        yield
    finally:
        for layer, (fused, keep) in zip(layers, saved):
            layer.fused_attn, layer.keep_attn_weights = fused, keep


def kept_token_attention(layer: nn.Module, size: Tuple[int, int], token: Tuple[int, int]) -> Tensor:
    """``(num_heads, H, W)``: the weights the query at ``token`` gave every token of the ``H x W`` map
    in ``layer``'s last forward (first image), from the weights the layer kept."""
    h, w = size
    ty, tx = _check_token(token, h, w)
    return torch.cat([kept.of_query(ty * w + tx)[0] for kept in layer.attn_weights]).view(-1, h, w)


@torch.no_grad()
def token_attention(layer: nn.Module, x: Tensor, token: Tuple[int, int]) -> Tensor:
    """Attention weights of the query at ``token`` in ``layer``, for the first image of ``x``.

    Args:
        layer: an attention layer (``pale.create_attention``).
        x: ``(B, H, W, C)``, the layer's input.
    Returns:
        ``(num_heads, H, W)``: per head, the softmax weights over the tokens (zero outside the
        group; each head sums to 1). Heads are in channel order (row-branch heads first).
    """
    _, h, w, _ = x.shape
    _check_token(token, h, w)
    with keeping_attention([layer]):
        layer(x[:1])
    weights = kept_token_attention(layer, (h, w), token)
    layer.attn_weights = None
    return weights


@dataclass
class StageAttention:
    """Head-averaged attention of the token in one block: ``weights`` ``(h, w)`` on the stage grid."""

    stage: int
    block: int
    mode: str
    grid_token: Tuple[int, int]
    weights: np.ndarray


def _token_on_grid(token: Tuple[float, float], image_size: Tuple[int, int], grid: Tuple[int, int]) -> Tuple[int, int]:
    """The grid cell containing the image pixel ``token`` (cells tile the image evenly)."""
    return tuple(min(int(t * g / s), g - 1) for t, s, g in zip(token, image_size, grid))  # type: ignore[return-value]


@torch.no_grad()
def stage_attention(model: nn.Module, image: Tensor, token: Tuple[float, float], block: int = -1) -> List[StageAttention]:
    """The attention weights of the image token at pixel ``token`` in one block of every stage.

    Runs the model once with the chosen blocks' attention keeping its weights, maps the pixel to
    each stage's grid (its size read with a forward pre-hook) and averages the weights over heads.

    Args:
        image: ``(1, C, H, W)``, preprocessed.
        token: ``(y, x)`` in pixels of ``image``.
        block: which block of each stage (Python index; -1 = last).
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise InputError(f"expected one preprocessed image of shape (1, C, H, W), got {tuple(image.shape)}")
    size = tuple(image.shape[-2:])
    _check_token(token, *size, what="image")
    stages = getattr(model, "stages", None)
    if stages is None or not all(hasattr(getattr(st, "blocks", [None])[0], "attn") for st in stages):
        raise InputError(f"{type(model).__name__} is not a Pale Transformer (no stages[i].blocks[j].attn)")
    for i, stage in enumerate(model.stages):
        if not -len(stage.blocks) <= block < len(stage.blocks):
            raise InputError(f"block {block} does not exist: stage {i + 1} has {len(stage.blocks)} block(s) "
                             f"(valid: {-len(stage.blocks)}..{len(stage.blocks) - 1})")
    chosen = [range(len(stage.blocks))[block] for stage in model.stages]
    layers = [stage.blocks[j].attn for stage, j in zip(model.stages, chosen)]
    grids: Dict[int, Tuple[int, int]] = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: grids.__setitem__(i, tuple(args[0].shape[1:3])))
             for i, layer in enumerate(layers)]
    try:
        with keeping_attention(layers):
            model.eval()(image)
    finally:
        for hk in hooks:
            hk.remove()
    result = []
    for i, (layer, j) in enumerate(zip(layers, chosen)):
        gt = _token_on_grid(token, size, grids[i])
        weights = kept_token_attention(layer, grids[i], gt).mean(0)
        result.append(StageAttention(i, j, layer.mode, gt, weights.float().cpu().numpy()))
        layer.attn_weights = None
    return result


def render_attention_overlay(image: np.ndarray, maps: Sequence[StageAttention], token: Tuple[float, float],
                             path: PathLike, title: Optional[str] = None, panel_inches: float = 3.0,
                             dpi: int = 100) -> Tuple[int, int]:
    """The image, then per stage the head-averaged weights (nearest upsampled, normalised to the
    stage's maximum) over the image, with the token marked. Written atomically; returns the PNG's (height, width):
    panels ``panel_inches`` wide and as tall as the image's aspect makes them, plus 0.6 inch for the
    titles: about ``((panel_inches * H / W + 0.6) * dpi, panel_inches * dpi * (1 + len(maps)))`` pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ih, iw = image.shape[:2]
    n = 1 + len(maps)
    fig_h = panel_inches * ih / iw + 0.6
    fig, axes = plt.subplots(1, n, figsize=(panel_inches * n, fig_h), dpi=dpi, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=1 - 0.55 / fig_h, wspace=0.04)
    try:
        panels = axes[0]
        # Pixel (y, x) covers [x, x+1) x [y, y+1); the stage grids cover the same extent.
        extent = (0, iw, ih, 0)
        panels[0].imshow(image, cmap="gray" if image.ndim == 2 else None, extent=extent)
        panels[0].set_title("input", fontsize=9)
        for ax, m in zip(panels[1:], maps):
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, extent=extent)
            weights = m.weights / max(float(m.weights.max()), 1e-12)
            ax.imshow(weights, extent=extent, cmap="inferno", alpha=0.6, interpolation="nearest",
                      vmin=0.0, vmax=1.0)
            gh, gw = m.weights.shape
            ax.set_title(f"stage {m.stage + 1} block {m.block + 1} ({gh}x{gw}, {m.mode})", fontsize=8)
        for ax in panels:
            ax.plot([token[1] + 0.5], [token[0] + 0.5], marker="o", color="red", markersize=5, markeredgecolor="white")
            ax.set_xlim(0, iw)
            ax.set_ylim(ih, 0)
            ax.axis("off")
        if title:
            fig.suptitle(title, fontsize=9)
        atomic_savefig(fig, path, dpi=dpi)
        width, height = fig.canvas.get_width_height()
    finally:
        plt.close(fig)
    return height, width
