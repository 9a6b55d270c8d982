"""Pale Transformer: a vision transformer backbone with pale-shaped self-attention.

Wu, Wu, Tan, Guo, "Pale Transformer: A General Vision Transformer Backbone with Pale-Shaped
Attention", AAAI 2022. The authors released no code; this follows the paper and the project's
design notes (docs/design.md says where they leave room and what was chosen).

Layout: every block and stage works on NHWC tensors ``(B, H, W, C)``. Images enter as NCHW and
feature maps leave ``forward_intermediates`` as NCHW. Convolutions inside a block run on NCHW
*views* of the NHWC tensors (``permute`` without a copy), so they see channels-last memory.

Grouping conventions (``H`` is padded up to ``Hp``, a multiple of the group size ``s``):
  * interlaced (PS-attention): ``G = Hp / s`` groups; group ``g`` holds rows ``g, g + G, ...,
    g + (s - 1) G``. This is a view of ``Hp`` as ``(s, G)``.
  * contiguous (CSWin stripes): group ``g`` holds rows ``g s, ..., g s + s - 1``, a view as ``(G, s)``.
Columns are grouped the same way on the transposed map. Padded positions are never attended to.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, Mlp, resample_abs_pos_embed_nhwc, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from . import attention_kernels

__all__ = ["PSAttention", "PaleBlock", "PaleStage", "PaleTransformer", "ATTN_MODES", "POS_EMBEDS"]

AttnMode = Literal["parallel", "sequential", "vanilla", "axial", "cross_shaped"]
ATTN_MODES: Tuple[str, ...] = ("parallel", "sequential", "vanilla", "axial", "cross_shaped")
POS_EMBEDS: Tuple[str, ...] = ("cpe", "ape", "none")
PairOrInt = Union[int, Tuple[int, int]]


# --------------------------------------------------------------------------------------------
# Grouping helpers
# --------------------------------------------------------------------------------------------

def _pair(value: PairOrInt, name: str) -> Tuple[int, int]:
    """An int or a pair of ints, each >= 1, as a pair."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return pair  # type: ignore[return-value]


def padded_length(length: int, group_size: int) -> int:
    """``length`` rounded up to a multiple of ``group_size``.

    Written without dividing a negative number: traced to ONNX, integer division truncates.
    """
    return (length + group_size - 1) // group_size * group_size


def group_rows(x: Tensor, group_size: int, interlaced: bool) -> Tensor:
    """Gather row groups into the batch dimension.

    Args:
        x: ``(B, Hp, W, C)`` with ``Hp`` a multiple of ``group_size``.
    Returns:
        ``(B * G, group_size * W, C)`` with ``G = Hp // group_size``; token order inside a group
        is (row within the group, column).
    """
    b, hp, w, c = x.shape
    g = hp // group_size
    if interlaced:
        x = x.view(b, group_size, g, w, c).transpose(1, 2)
    else:
        x = x.view(b, g, group_size, w, c)
    return x.reshape(b * g, group_size * w, c)


def ungroup_rows(x: Tensor, batch: int, group_size: int, width: int, interlaced: bool) -> Tensor:
    """Inverse of :func:`group_rows`: ``(B * G, group_size * W, C)`` -> ``(B, Hp, W, C)``."""
    g = x.shape[0] // batch
    c = x.shape[-1]
    x = x.view(batch, g, group_size, width, c)
    if interlaced:
        x = x.transpose(1, 2)
    return x.reshape(batch, g * group_size, width, c)


def valid_key_mask(height: int, padded_height: int, width: int, group_size: int, interlaced: bool,
                   device: torch.device) -> Tensor:
    """Which grouped tokens are real rows (not padding): ``(G, group_size * W)`` bool."""
    valid = (torch.arange(padded_height, device=device) < height).view(1, padded_height, 1, 1)
    return group_rows(valid.expand(1, padded_height, width, 1), group_size, interlaced).squeeze(-1)


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``(N, L, C)`` -> ``(N, heads, L, C / heads)``."""
    n, length, c = x.shape
    return x.view(n, length, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """``(N, heads, L, D)`` -> ``(N, L, heads * D)``."""
    n, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * d)


def row_group_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, group_size: int,
                        interlaced: bool) -> Tensor:
    """Multi-head self-attention inside groups of ``group_size`` rows, each spanning all columns.

    Args:
        q, k, v: ``(B, H, W, C)``; ``C`` divisible by ``num_heads``.
    Returns:
        ``(B, H, W, C)``. Rows are padded to a multiple of ``group_size``; padded keys are masked
        and padded queries dropped, so the result depends only on the real tokens of each group.
    """
    b, h, w, c = q.shape
    hp = padded_length(h, group_size)
    mask = None
    if hp != h:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, hp - h)) for t in (q, k, v))
        groups = hp // group_size
        mask = valid_key_mask(h, hp, w, group_size, interlaced, q.device)
        mask = mask.unsqueeze(0).expand(b, groups, group_size * w).reshape(b * groups, 1, 1, -1)
    qg, kg, vg = (_split_heads(group_rows(t, group_size, interlaced), num_heads) for t in (q, k, v))
    out = attention_kernels.attention(qg, kg, vg, mask)
    out = ungroup_rows(_merge_heads(out), b, group_size, w, interlaced)
    return out[:, :h]


def column_group_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, group_size: int,
                           interlaced: bool) -> Tensor:
    """:func:`row_group_attention` over groups of columns. ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
    out = row_group_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              num_heads, group_size, interlaced)
    return out.transpose(1, 2)


def _branch_grid(x: Tensor, group_size: int, interlaced: bool) -> Tuple[Tensor, Tensor]:
    """Views of a square map's two channel halves with their groups leading.

    Args:
        x: ``(B, P, P, C)`` with ``P`` a multiple of ``group_size``.
    Returns:
        ``rows, cols``, each ``(B, G, s, a, b, C / 2)`` (no copy), ``G = P / s``: ``rows`` is the
        first channel half in row groups (token order: row within the group, then column as
        ``(a, b)``); ``cols`` the second half in column groups (column within the group, then row).
    """
    b, p, _, c = x.shape
    s, g = group_size, p // group_size
    # Each side of the map as (outer, inner): interlaced groups index the inner part (row = i g + gi),
    # contiguous stripes the outer part (row = gi s + i).
    x = x.view(b, s, g, s, g, 2, c // 2) if interlaced else x.view(b, g, s, g, s, 2, c // 2)
    group_r, within_r, group_c, within_c = (2, 1, 4, 3) if interlaced else (1, 2, 3, 4)
    first, second = x.unbind(5)  # unbind, not two slices: its backward is one stack, not two zero-fills
    return (first.permute(0, group_r, within_r, 3, 4, 5), second.permute(0, group_c, within_c, 1, 2, 5))


def group_branches(x: Tensor, group_size: int, interlaced: bool) -> Tensor:
    """Row groups of the first channel half and column groups of the second, stacked in one copy.

    Args:
        x: ``(B, P, P, C)``, ``P`` a multiple of ``group_size``.
    Returns:
        ``(2 B G, group_size * P, C / 2)``: the ``B G`` row groups, then the ``B G`` column groups,
        in the token order of :func:`group_rows` (columns: of the transposed map).
    """
    b, p, _, c = x.shape
    return torch.stack(_branch_grid(x, group_size, interlaced)).view(-1, group_size * p, c // 2)


def ungroup_branches(x: Tensor, batch: int, group_size: int, interlaced: bool) -> Tensor:
    """Inverse of :func:`group_branches`: ``(2 B G, s P, C / 2)`` -> ``(B, P, P, C)``, in one copy."""
    _, length, half = x.shape
    s, p = group_size, length // group_size
    g = p // s
    inner = (s, g, s, g) if interlaced else (g, s, g, s)
    rows, cols = x.view(2, batch, g, s, *inner[2:], half).unbind(0)
    if interlaced:  # back from (group, within) to the map's (within, group) order
        rows, cols = rows.transpose(1, 2), cols.transpose(1, 2)
    # rows: (B, r1, r2, c1, c2, half) already; cols: (B, c1, c2, r1, r2, half) -> rows first.
    cols = cols.permute(0, 3, 4, 1, 2, 5)
    return torch.cat((rows, cols), dim=-1).view(batch, p, p, 2 * half)


def pale_branch_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, group_size: int,
                          interlaced: bool) -> Tensor:
    """Row-group attention on the first channel half and column-group attention on the second,
    as one attention call over both branches' groups.

    Computes what ``cat(row_group_attention(first halves), column_group_attention(second halves))``
    computes, with fewer, larger kernels: one grouping copy per input, one SDPA call, one copy out.
    Only for square maps that need no padding (every stage of a 224x224 input with pale size 7), so
    it never computes more than the two calls would.

    Args:
        q, k, v: ``(B, P, P, C)`` with ``P`` a multiple of ``group_size``.
        num_heads: heads per branch.
    Returns:
        ``(B, P, P, C)``.
    """
    b, h, w, c = q.shape
    if h != w or h % group_size:
        raise ValueError(f"pale_branch_attention needs a square map whose side is a multiple of the "
                         f"group size {group_size}, got {h}x{w}")
    qg, kg, vg = (_split_heads(group_branches(t, group_size, interlaced), num_heads) for t in (q, k, v))
    out = attention_kernels.attention(qg, kg, vg)
    return ungroup_branches(_merge_heads(out), b, group_size, interlaced)


def pale_count(height: int, width: int, pale_size: Tuple[int, int]) -> int:
    """Number of pales ``N = max(ceil(h / s_r), ceil(w / s_c))``: the map is padded to ``(N s_r, N s_c)``
    so that ``h / s_r = w / s_c = N``, as the paper's vanilla PS-attention requires."""
    s_r, s_c = pale_size
    return max(-(-height // s_r), -(-width // s_c))


@functools.lru_cache(maxsize=64)
def _pale_index(num_pales: int, pale_size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """Which tokens of the padded ``(N s_r, N s_c)`` map each pale holds, and how many pales hold each token.

    Pale ``i`` is interlaced row group ``i`` (rows ``i, i + N, ..., i + (s_r - 1) N``, all columns)
    joined with interlaced column group ``i`` (columns ``i, i + N, ...``, all rows), each token once.

    Returns:
        ``index``: ``(N, P)`` row-major token indices, ``P = s_r Wp + s_c Hp - s_r s_c`` (the row
        group's tokens, then the column group's tokens outside it); ``count``: ``(Hp Wp,)``, 1 or 2.
    """
    n, (s_r, s_c) = num_pales, pale_size
    hp, wp = n * s_r, n * s_c
    pale = torch.arange(n).view(n, 1, 1)
    rows = pale + n * torch.arange(s_r).view(1, s_r, 1)                       # (N, s_r, 1)
    in_row_group = rows * wp + torch.arange(wp).view(1, 1, wp)                 # (N, s_r, Wp)
    other_rows = torch.arange(hp).view(1, hp, 1).expand(n, hp, 1)
    other_rows = other_rows[other_rows % n != pale].view(n, hp - s_r, 1)       # rows outside the row group
    cols = pale + n * torch.arange(s_c).view(1, 1, s_c)                        # (N, 1, s_c)
    in_col_group = other_rows * wp + cols                                      # (N, Hp - s_r, s_c)
    index = torch.cat((in_row_group.reshape(n, -1), in_col_group.reshape(n, -1)), dim=1)
    count = torch.zeros(hp * wp, dtype=torch.long).index_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.long))
    return index, count


def per_pale_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, pale_size: Tuple[int, int]) -> Tensor:
    """The paper's vanilla PS-attention: multi-head self-attention inside each whole pale.

    The map is padded to ``(N s_r, N s_c)`` (:func:`pale_count`) and split into ``N`` pales of
    ``P = s_r Wp + s_c Hp - s_r s_c`` tokens (:func:`_pale_index`); all channels and heads attend
    inside each pale individually. Padded keys are masked and padded queries dropped. Pales overlap:
    token ``(y, x)`` lies in pale ``y mod N`` and pale ``x mod N``, so it gets one output from each
    pale it is in, and its result is their mean. The paper does not say how they combine; the mean
    keeps every token's output on the same scale whether it lies in one pale or two.

    Cost: one attention call over ``B N`` sequences of ``P`` tokens, ``2 c N P^2`` multiply-adds.

    Args:
        q, k, v: ``(B, H, W, C)``; ``C`` divisible by ``num_heads``.
    Returns:
        ``(B, H, W, C)``.
    """
    b, h, w, c = q.shape
    n = pale_count(h, w, pale_size)
    hp, wp = n * pale_size[0], n * pale_size[1]
    index, count = _pale_index(n, tuple(pale_size))
    index, count = index.to(q.device), count.to(q.device)
    padded = (hp, wp) != (h, w)
    if padded:
        q, k, v = (F.pad(t, (0, 0, 0, wp - w, 0, hp - h)) for t in (q, k, v))
    tokens = index.shape[1]
    qp, kp, vp = (_split_heads(t.reshape(b, hp * wp, c).index_select(1, index.view(-1)).view(b * n, tokens, c),
                               num_heads) for t in (q, k, v))
    mask = None
    if padded:
        real = ((torch.arange(hp, device=q.device) < h).view(hp, 1)
                & (torch.arange(wp, device=q.device) < w).view(1, wp)).view(-1)
        mask = real[index].view(1, n, 1, 1, tokens).expand(b, n, 1, 1, tokens).reshape(b * n, 1, 1, tokens)
    out = _merge_heads(F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask))   # (B N, P, C)
    out = out.new_zeros(b, hp * wp, c).index_add(1, index.view(-1), out.view(b, n * tokens, c))
    out = out / count.view(1, -1, 1).to(out.dtype)
    return out.view(b, hp, wp, c)[:, :h, :w]


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

class SeparableProjection(nn.Module):
    """CvT-style separable projection: depthwise 3x3 conv (no bias) -> BatchNorm -> Linear.

    ``(B, H, W, C)`` -> ``(B, H, W, C_out)``.
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.pw = nn.Linear(dim, out_dim or dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 3, 1, 2)
        if self.bn.training or self.bn.running_mean is None:
            x = self.bn(self.dw(x))
        else:
            # BatchNorm on running statistics is affine per channel: fold it into the conv. Written
            # out rather than torch.nn.utils.fuse_conv_bn_weights, which returns detached Parameters:
            # eval-mode BatchNorm with trained weights (frozen-BN fine-tuning) needs the gradients.
            scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
            bias = self.bn.bias - self.bn.running_mean * scale
            x = F.conv2d(x, self.dw.weight * scale.view(-1, 1, 1, 1), bias, padding=1, groups=self.dw.groups)
        return self.pw(x.permute(0, 2, 3, 1))


class PSAttention(nn.Module):
    """Pale-shaped self-attention and the attention modes the paper's ablations compare.

    Input and output are ``(B, H, W, C)`` (NHWC) for any ``H, W >= 1``. Queries, keys and values
    come from separable convolutions (Eq. 13); the output goes through a linear projection.

    Modes:
        * ``parallel`` (default, Eq. 1-3): the first ``C/2`` channels and ``num_heads/2`` heads attend
          inside groups of ``s_r`` interlaced rows, the last ``C/2`` channels and heads inside groups
          of ``s_c`` interlaced columns; the two results are concatenated.
        * ``sequential``: one direction (``direction='row'`` or ``'column'``) on all channels and heads;
          the network alternates the direction from block to block.
        * ``vanilla``: all channels and heads attend inside each whole pale (see :func:`per_pale_attention`).
        * ``axial``: ``parallel`` with pale size 1 (one row, one column).
        * ``cross_shaped``: ``parallel`` with contiguous stripes of ``stripe_width`` rows / columns (CSWin).

    Args:
        dim: channels ``C``.
        num_heads: heads; must split into two equal branches for the two-branch modes.
        pale_size: ``s`` or ``(s_r, s_c)``, rows and columns per pale (parallel, sequential, vanilla).
        mode: one of :data:`ATTN_MODES`.
        direction: ``'row'`` or ``'column'``; only for ``sequential``.
        stripe_width: stripe width for ``cross_shaped``.
    """

    def __init__(self, dim: int, num_heads: int, pale_size: PairOrInt = 7, mode: AttnMode = "parallel",
                 direction: Optional[Literal["row", "column"]] = None, stripe_width: int = 7):
        super().__init__()
        if mode not in ATTN_MODES:
            raise ValueError(f"unknown attention mode {mode!r}; expected one of {ATTN_MODES}")
        if not isinstance(dim, int) or dim < 1 or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"dim and num_heads must be positive ints, got dim={dim!r}, num_heads={num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        two_branch = mode in ("parallel", "axial", "cross_shaped")
        if two_branch and num_heads % 2:
            raise ValueError(f"mode {mode!r} splits heads between a row and a column branch: "
                             f"num_heads={num_heads} must be even")
        if mode == "sequential":
            direction = direction or "row"
            if direction not in ("row", "column"):
                raise ValueError(f"direction must be 'row' or 'column', got {direction!r}")
        elif direction is not None:
            raise ValueError(f"direction is only used by mode='sequential', not {mode!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.mode = mode
        self.direction = direction
        if mode == "axial":
            self.group_size = (1, 1)
        elif mode == "cross_shaped":
            self.group_size = _pair(stripe_width, "stripe_width")
        else:
            self.group_size = _pair(pale_size, "pale_size")
        self.interlaced = mode != "cross_shaped"
        self.q = SeparableProjection(dim)
        self.k = SeparableProjection(dim)
        self.v = SeparableProjection(dim)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        extra = f", direction={self.direction}" if self.direction else ""
        return f"dim={self.dim}, num_heads={self.num_heads}, mode={self.mode}, group_size={self.group_size}{extra}"

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error for a tensor this layer cannot take."""
        if x.ndim != 4:
            raise ValueError(f"PSAttention expects (B, H, W, C) input, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"PSAttention(dim={self.dim}) got {x.shape[-1]} channels in shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"PSAttention expects a floating-point tensor, got {x.dtype}")

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The mode's attention on projected ``q, k, v`` of shape ``(B, H, W, C)``."""
        s_r, s_c = self.group_size
        if self.mode == "vanilla":
            return per_pale_attention(q, k, v, self.num_heads, self.group_size)
        if self.mode == "sequential":
            if self.direction == "row":
                return row_group_attention(q, k, v, self.num_heads, s_r, self.interlaced)
            return column_group_attention(q, k, v, self.num_heads, s_c, self.interlaced)
        half, heads = self.dim // 2, self.num_heads // 2
        h, w = q.shape[1:3]
        if s_r == s_c and h == w and h % s_r == 0:
            # Same result as the two calls below, in fewer kernels (tested equal).
            return pale_branch_attention(q, k, v, heads, s_r, self.interlaced)
        rows = row_group_attention(q[..., :half], k[..., :half], v[..., :half], heads, s_r, self.interlaced)
        cols = column_group_attention(q[..., half:], k[..., half:], v[..., half:], heads, s_c, self.interlaced)
        return torch.cat((rows, cols), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.proj(self.attend(self.q(x), self.k(x), self.v(x)))


class ConvPosEnc(nn.Module):
    """Conditional position encoding (CPE) with its residual: ``x + DWConv3x3(x)``, ``(B, H, W, C)`` -> same.

    The residual is folded into the convolution (its centre tap plus one), which gives the same
    result and gradients in one kernel instead of a convolution and an addition.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        identity = torch.zeros_like(self.proj.weight)
        identity[:, :, 1, 1] = 1.0
        self.register_buffer("identity", identity, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.proj.weight + self.identity
        return F.conv2d(x.permute(0, 3, 1, 2), weight, self.proj.bias, padding=1, groups=self.proj.groups).permute(0, 2, 3, 1)


class PaleBlock(nn.Module):
    """CPE, then pre-norm PS-attention and MLP with residuals and stochastic depth (Eq. 6-8).

    ``(B, H, W, C)`` -> ``(B, H, W, C)``.
    """

    def __init__(self, dim: int, num_heads: int, pale_size: PairOrInt = 7, attn_mode: AttnMode = "parallel",
                 direction: Optional[Literal["row", "column"]] = None, stripe_width: int = 7,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, use_cpe: bool = True,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm, act_layer: Callable[..., nn.Module] = nn.GELU):
        super().__init__()
        self.cpe = ConvPosEnc(dim) if use_cpe else None
        self.norm1 = norm_layer(dim)
        self.attn = PSAttention(dim, num_heads, pale_size, attn_mode, direction, stripe_width)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.cpe is not None:
            x = self.cpe(x)  # x + DWConv(x)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ConvPatchMerging(nn.Module):
    """Overlapping strided convolution then LayerNorm: ``(B, H, W, C_in)`` -> ``(B, H', W', C_out)``."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, stride: int,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size, stride, padding=(kernel_size - stride + 1) // 2)
        self.norm = norm_layer(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class PaleStage(nn.Module):
    """Patch merging (stride 2) when ``downsample``, then the learned position table if any, then
    ``depth`` blocks. NHWC in and out.

    Args:
        pos_embed_size: ``(h, w)`` of a learned absolute position table (APE) added to the merged
            map, resized bicubically for other map sizes; None for no table.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, downsample: bool,
                 pale_size: PairOrInt = 7, attn_mode: AttnMode = "parallel", stripe_width: int = 7,
                 mlp_ratio: float = 4.0, drop_path: Sequence[float] = (), use_cpe: bool = True,
                 pos_embed_size: Optional[Tuple[int, int]] = None,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = ConvPatchMerging(in_dim, dim, 3, 2, norm_layer) if downsample else nn.Identity()
        self.pos_embed: Optional[nn.Parameter] = None
        if pos_embed_size is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, *pos_embed_size, dim))
            trunc_normal_(self.pos_embed, std=0.02)
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.Sequential(*[
            PaleBlock(dim, num_heads, pale_size, attn_mode,
                      direction=("row" if i % 2 == 0 else "column") if attn_mode == "sequential" else None,
                      stripe_width=stripe_width, mlp_ratio=mlp_ratio, drop_path=drop_path[i],
                      use_cpe=use_cpe, norm_layer=norm_layer)
            for i in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.pos_embed is not None:
            x = x + resample_abs_pos_embed_nhwc(self.pos_embed, list(x.shape[1:3])).to(x.dtype)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _per_stage(value: Any, num_stages: int, name: str) -> List[Any]:
    """Expand an int, a pair, or a per-stage sequence of those to one entry per stage."""
    if isinstance(value, int) or (isinstance(value, (tuple, list)) and len(value) == 2 and num_stages != 2
                                  and all(isinstance(v, int) for v in value)):
        return [value] * num_stages
    if isinstance(value, (tuple, list)) and len(value) == num_stages:
        return list(value)
    raise ValueError(f"{name} must be an int, a pair, or one entry per stage ({num_stages}), got {value!r}")


def stage_grids(img_size: Tuple[int, int], num_stages: int) -> List[Tuple[int, int]]:
    """``(h, w)`` of each stage's map for an ``img_size`` image: the 7x7 stride-4 stem (padding 2),
    then a 3x3 stride-2 merging (padding 1) per later stage."""
    h, w = ((s + 4 - 7) // 4 + 1 for s in img_size)
    grids = [(h, w)]
    for _ in range(num_stages - 1):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        grids.append((h, w))
    return grids


class PaleTransformer(nn.Module):
    """Pale Transformer: conv stem (7x7, stride 4), four stages of Pale blocks with overlapping-conv
    patch merging between them, final LayerNorm, global average pooling and a linear head.

    Takes NCHW images of any size >= 3x3; works internally in NHWC.

    Args:
        img_size: training image size; with ``pos_embed='ape'`` it sizes each stage's learned
            position table (resized for other inputs).
        in_chans: input channels.
        num_classes: classifier outputs (0 for no head).
        global_pool: ``'avg'`` or ``''`` (no pooling).
        embed_dims, depths, num_heads: per stage.
        pale_size: ``s``, ``(s_r, s_c)``, or one of those per stage.
        attn_mode: one of :data:`ATTN_MODES`, for every block.
        stripe_width: stripe width for ``cross_shaped`` (int or per stage).
        mlp_ratio: MLP hidden width over ``dim``.
        pos_embed: ``'cpe'`` (a depthwise conv in every block), ``'ape'`` (a learned table per stage,
            added after its patch merging) or ``'none'``.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block; rates rise linearly from 0 over blocks.
    """

    def __init__(self, img_size: PairOrInt = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dims: Sequence[int] = (64, 128, 256, 512),
                 depths: Sequence[int] = (2, 2, 16, 2), num_heads: Sequence[int] = (2, 4, 8, 16),
                 pale_size: Any = 7, attn_mode: AttnMode = "parallel", stripe_width: Any = 7,
                 mlp_ratio: float = 4.0, pos_embed: str = "cpe", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"unknown position encoding {pos_embed!r}; expected one of {POS_EMBEDS}")
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"unknown attention mode {attn_mode!r}; expected one of {ATTN_MODES}")
        num_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == num_stages):
            raise ValueError(f"embed_dims {tuple(embed_dims)}, depths {tuple(depths)} and num_heads "
                             f"{tuple(num_heads)} must have one entry per stage")
        pale_sizes = _per_stage(pale_size, num_stages, "pale_size")
        stripe_widths = _per_stage(stripe_width, num_stages, "stripe_width")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = _pair(img_size, "img_size")
        self.attn_mode = attn_mode
        self.num_features = self.head_hidden_size = embed_dims[-1]

        self.stem = ConvPatchMerging(in_chans, embed_dims[0], 7, 4, norm_layer)
        grids = stage_grids(self.img_size, num_stages) if pos_embed == "ape" else [None] * num_stages

        dpr = [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(depths)).split(list(depths))]
        stages, in_dim, reduction = [], embed_dims[0], 4
        self.feature_info = []
        for i in range(num_stages):
            stages.append(PaleStage(
                in_dim, embed_dims[i], depths[i], num_heads[i], downsample=i > 0,
                pale_size=pale_sizes[i], attn_mode=attn_mode, stripe_width=stripe_widths[i],
                mlp_ratio=mlp_ratio, drop_path=dpr[i], use_cpe=pos_embed == "cpe", pos_embed_size=grids[i],
                norm_layer=norm_layer))
            reduction = reduction * 2 if i > 0 else reduction
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
            in_dim = embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool,
                                   drop_rate=drop_rate, input_fmt="NHWC")
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Linear: truncated normal (std 0.02), zero bias; norms: unit weight, zero bias.
        # Convolutions keep PyTorch's default (Kaiming-uniform), as in Swin and CSWin.
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---- timm model API ----------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {f"stages.{i}.pos_embed" for i, stage in enumerate(self.stages) if stage.pos_embed is not None}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.(?:downsample|pos_embed)", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # Blocks are checkpointed inside each stage only (as timm's Swin): checkpointing the stages as
        # well would nest, and every block would run its forward three times per training step.
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error for an image batch the model cannot take."""
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]} in shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point image tensor, got {x.dtype}")
        if x.shape[-2] < 3 or x.shape[-1] < 3:
            raise ValueError(f"images must be at least 3x3 for the 7x7/stride-4 stem, got {tuple(x.shape[-2:])}")

    def _embed(self, x: Tensor) -> Tensor:
        """NCHW image -> NHWC stem tokens."""
        self.check_input(x)
        return self.stem(x.permute(0, 2, 3, 1))

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> normed final NHWC map ``(B, H/32, W/32, C4)``."""
        x = self._embed(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Stage outputs as NCHW maps (strides 4, 8, 16, 32), and optionally the final features.

        Args:
            indices: last ``n`` stages if an int, the listed stages if a sequence, all if None.
            norm: apply the final norm to the last stage's output.
            stop_early: stop after the last requested stage.
            output_fmt: ``'NCHW'`` or ``'NHWC'``.
            intermediates_only: return only the list of maps.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self._embed(x)
        last = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if len(stages) == last + 1 else x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last of ``indices`` (and the norm and head if asked)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: PaleTransformer) -> Dict[str, Tensor]:
    """Accept our own checkpoints (plain, or wrapped by ``pale train``) for timm's loader.

    Unwraps ``model``/``state_dict`` containers, strips a DDP ``module.`` prefix, and resizes the
    stages' learned position tables saved at another image size.
    """
    own = model.state_dict()
    for key in ("model_ema", "model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = {}
    for name, value in state_dict.items():
        name = name[len("module."):] if name.startswith("module.") else name
        if name.endswith(".pos_embed") and name in own and value.shape != own[name].shape:
            value = resample_abs_pos_embed_nhwc(value, list(own[name].shape[1:3]))
        out[name] = value
    return out


def _create_pale(variant: str, pretrained: bool = False, **kwargs: Any) -> PaleTransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        PaleTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    # No released weights exist: pretrained=True needs pretrained_cfg_overlay=dict(file=...).
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj", "classifier": "head.fc", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "pale_tiny": _cfg(),
    "pale_small": _cfg(),
    "pale_base": _cfg(),
})

# Table 1: dims C_i, depths and heads H_i per stage (pale size 7 and MLP ratio 4 everywhere).
MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    "pale_tiny": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 16, 2), num_heads=(2, 4, 8, 16)),
    "pale_small": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 16, 2), num_heads=(2, 4, 8, 16)),
    "pale_base": dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 16, 2), num_heads=(4, 8, 16, 32)),
}


@register_model
def pale_tiny(pretrained: bool = False, **kwargs: Any) -> PaleTransformer:
    """Pale-T: 22M parameters, 4.2G multiply-adds at 224x224."""
    return _create_pale("pale_tiny", pretrained, **dict(MODEL_ARGS["pale_tiny"], **kwargs))


@register_model
def pale_small(pretrained: bool = False, **kwargs: Any) -> PaleTransformer:
    """Pale-S: 48M parameters, 9.0G multiply-adds at 224x224."""
    return _create_pale("pale_small", pretrained, **dict(MODEL_ARGS["pale_small"], **kwargs))


@register_model
def pale_base(pretrained: bool = False, **kwargs: Any) -> PaleTransformer:
    """Pale-B: 85M parameters, 15.6G multiply-adds at 224x224."""
    return _create_pale("pale_base", pretrained, **dict(MODEL_ARGS["pale_base"], **kwargs))
