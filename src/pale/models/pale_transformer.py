"""Pale Transformer: a vision transformer backbone with pale-shaped self-attention.

Wu, Wu, Tan, Guo, "Pale Transformer: A General Vision Transformer Backbone with Pale-Shaped
Attention", AAAI 2022. The authors released no code; this follows the paper (docs/design.md lists,
with reasons, everything it leaves open and every place we add to it).

Layout: every block and stage works on NHWC tensors ``(B, H, W, C)`` (``output_fmt = 'NHWC'``).
Images enter as NCHW and ``forward_intermediates`` returns NCHW maps by default. Convolutions inside
a block run on NCHW *views* of the NHWC tensors (``permute`` without a copy).

The attention is PS-attention (:class:`PSAttention`, Eq. 1-3): half of the channels attend inside
groups of interlaced rows, the other half inside groups of interlaced columns. Axial attention (groups
of one row / column) and CSWin's cross-shaped attention (contiguous stripes) are the same operator
with other groups. The sequential and vanilla forms of the paper's ablation (Table 8) live in
:mod:`pale.models.pale_ablations` and plug into the block through :func:`create_attention`.

Grouping conventions (``H`` is padded up to ``Hp``, a multiple of the group size ``s``):
  * interlaced (PS-attention): ``G = Hp / s`` groups; group ``g`` holds rows ``g, g + G, ...,
    g + (s - 1) G``. This is a view of ``Hp`` as ``(s, G)``.
  * contiguous (CSWin stripes): group ``g`` holds rows ``g s, ..., g s + s - 1``, a view as ``(G, s)``.
Columns are grouped the same way on the transposed map. Padded positions are never attended to.

Tracing: every function whose control flow depends on tensor sizes is a leaf for ``torch.fx``
(``torch.fx.wrap``), so FX graphs run it as it is at any size. Under ``torch.jit.trace`` and
``torch.export`` the attention always pads and masks (by zero rows when nothing needs padding), so
one trace serves every input size.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (ClassifierHead, ConvNormAct, DropPath, Mlp, calculate_drop_path_rates, is_exporting,
                         to_2tuple, trunc_normal_, use_fused_attn)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

try:  # newer timm records a model's resize for save_for_hf; older timm has nothing to record
    from timm.models._input import update_model_input_size
except ImportError:
    update_model_input_size = None

from . import attention_kernels

__all__ = ["PSAttention", "GroupedAttention", "PaleBlock", "PaleStage", "PaleTransformer", "AttentionLayout",
           "AttentionWeights", "ATTN_MODES", "POS_EMBEDS", "STEM_TYPES", "DeepConvStem", "attention_layout", "block_direction",
           "create_attention", "register_attention", "padded_length", "pale_count", "stage_grids", "as_pair",
           "per_stage"]

AttnMode = Literal["parallel", "sequential", "vanilla", "axial", "cross_shaped"]
ATTN_MODES: Tuple[str, ...] = ("parallel", "sequential", "vanilla", "axial", "cross_shaped")
#: Modes computed by :class:`PSAttention`: a row branch and a column branch on half the channels each.
TWO_BRANCH_MODES: Tuple[str, ...] = ("parallel", "axial", "cross_shaped")
DIRECTIONS: Tuple[str, ...] = ("row", "column")
POS_EMBEDS: Tuple[str, ...] = ("cpe", "ape", "none")
#: ``overlap``: the paper's 7x7 stride-4 convolution (Sec. 3.3); ``deep``: :class:`DeepConvStem`, stride 2.
STEM_TYPES: Tuple[str, ...] = ("overlap", "deep")
PairOrInt = Union[int, Tuple[int, int]]
DeviceLike = Optional[Union[str, torch.device]]


# --------------------------------------------------------------------------------------------
# Configuration (shared with pale.complexity)
# --------------------------------------------------------------------------------------------

def as_pair(value: PairOrInt, name: str) -> Tuple[int, int]:
    """An int or a pair of ints, each >= 1, as a pair; a clear error naming ``name`` otherwise."""
    pair = to_2tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return pair  # type: ignore[return-value]


def per_stage(value: Any, num_stages: int, name: str) -> List[Any]:
    """An int, a pair, or one of those per stage, as one entry per stage.

    Not timm's ``to_ntuple``: a pair ``(s_r, s_c)`` is one setting for every stage, not two stages.
    """
    if isinstance(value, int) or (isinstance(value, (tuple, list)) and len(value) == 2 and num_stages != 2
                                  and all(isinstance(v, int) for v in value)):
        return [value] * num_stages
    if isinstance(value, (tuple, list)) and len(value) == num_stages:
        return list(value)
    raise ValueError(f"{name} must be an int, a pair, or one entry per stage ({num_stages}), got {value!r}")


def padded_length(length: int, group_size: int) -> int:
    """``length`` rounded up to a multiple of ``group_size``.

    Written without dividing a negative number: traced to ONNX, integer division truncates.
    """
    return (length + group_size - 1) // group_size * group_size


def pale_count(height: int, width: int, pale_size: Tuple[int, int]) -> int:
    """Number of pales ``N = max(ceil(h / s_r), ceil(w / s_c))`` of vanilla PS-attention: the map is
    padded to ``(N s_r, N s_c)`` so that ``h / s_r = w / s_c = N``, as the paper requires."""
    s_r, s_c = pale_size
    return max(padded_length(height, s_r) // s_r, padded_length(width, s_c) // s_c)


def stage_grids(img_size: Tuple[int, int], num_stages: int, stem_type: str = "overlap") -> List[Tuple[int, int]]:
    """``(h, w)`` of each stage's map for an ``img_size`` image: the 7x7 stride-4 stem (padding 2) or
    the deep stem (``ceil(s / 2)``), then a 3x3 stride-2 merging (padding 1) per later stage."""
    if stem_type == "deep":
        h, w = ((s + 1) // 2 for s in img_size)
    else:
        h, w = ((s + 4 - 7) // 4 + 1 for s in img_size)
    grids = [(h, w)]
    for _ in range(num_stages - 1):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        grids.append((h, w))
    return grids


@dataclass(frozen=True)
class AttentionLayout:
    """How one attention layer groups its tokens.

    Attributes:
        mode: one of :data:`ATTN_MODES`.
        group_size: ``(s_r, s_c)``, rows per row group and columns per column group.
        interlaced: interlaced groups (PS-attention, Eq. 1) or contiguous stripes (CSWin).
        direction: ``'row'`` or ``'column'`` for ``sequential``, else None.
    """

    mode: str
    group_size: Tuple[int, int]
    interlaced: bool
    direction: Optional[str] = None


def block_direction(mode: str, block_index: int) -> Optional[str]:
    """The direction of block ``block_index`` of a stage: ``sequential`` alternates row and column
    attention from block to block (starting with rows); the other modes have none."""
    return ("row" if block_index % 2 == 0 else "column") if mode == "sequential" else None


def attention_layout(mode: str, pale_size: PairOrInt = 7, stripe_width: PairOrInt = 7,
                     direction: Optional[str] = None) -> AttentionLayout:
    """The groups of ``mode``: the pale size (interlaced), ``(1, 1)`` for axial, the stripe width
    (contiguous) for cross-shaped; ``sequential`` attends along ``direction`` (default rows)."""
    if mode not in ATTN_MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {ATTN_MODES}")
    if mode == "sequential":
        direction = direction or "row"
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'row' or 'column', got {direction!r}")
    elif direction is not None:
        raise ValueError(f"direction is only used by mode='sequential', not {mode!r}")
    if mode == "axial":
        group_size = (1, 1)
    elif mode == "cross_shaped":
        group_size = as_pair(stripe_width, "stripe_width")
    else:
        group_size = as_pair(pale_size, "pale_size")
    return AttentionLayout(mode, group_size, interlaced=mode != "cross_shaped", direction=direction)


# --------------------------------------------------------------------------------------------
# Checks and tracing
# --------------------------------------------------------------------------------------------

def traced_for_any_size() -> bool:
    """Whether this call is being recorded into a graph that must serve every input size:
    ``torch.jit.trace`` (and the TorchScript ONNX exporter) or ``torch.export`` (and the dynamo
    ONNX exporter). Size-dependent shortcuts are then left out of the graph."""
    return torch.jit.is_tracing() or is_exporting()


# torch.fx.wrap (not timm's register_notrace_function) makes a function a leaf for every FX tracer,
# also torchvision's create_feature_extractor called directly, which does not read timm's list.
@torch.fx.wrap
def check_image_batch(x: Tensor, in_chans: int) -> Tensor:
    """``x`` itself, after checking that it is a floating-point ``(B, in_chans, H, W)`` batch with
    ``H, W >= 3``. A leaf in FX graphs, so that they check their input too."""
    if x.ndim != 4:
        raise ValueError(f"expected an image batch of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} in shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point image tensor, got {x.dtype}")
    if x.shape[-2] < 3 or x.shape[-1] < 3:
        raise ValueError(f"images must be at least 3x3 for the Pale stem, got "
                         f"{int(x.shape[-2])}x{int(x.shape[-1])}")
    return x


@torch.fx.wrap
def check_token_map(x: Tensor, dim: int, layer: str) -> Tensor:
    """``x`` itself, after checking that it is a floating-point ``(B, H, W, dim)`` map."""
    if x.ndim != 4:
        raise ValueError(f"{layer} expects (B, H, W, C) input, got shape {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(f"{layer}(dim={dim}) got {x.shape[-1]} channels in shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{layer} expects a floating-point tensor, got {x.dtype}")
    return x


# --------------------------------------------------------------------------------------------
# Attention inside groups of rows
# --------------------------------------------------------------------------------------------

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


def ungroup_rows(x: Tensor, batch: int, padded_height: int, group_size: int, width: int, interlaced: bool) -> Tensor:
    """Inverse of :func:`group_rows`: ``(B * G, group_size * W, C)`` -> ``(B, Hp, W, C)``, ``Hp = padded_height``."""
    g = padded_height // group_size  # not x.shape[0] // batch: an empty batch has no groups to count
    c = x.shape[-1]
    x = x.view(batch, g, group_size, width, c)
    if interlaced:
        x = x.transpose(1, 2)
    return x.reshape(batch, g * group_size, width, c)


def real_key_mask(height: int, padded_height: int, width: int, group_size: int, interlaced: bool,
                  device: torch.device) -> Tensor:
    """Which grouped tokens are real rows (not padding): ``(G, group_size * W)`` bool."""
    real = (torch.arange(padded_height, device=device) < height).view(1, padded_height, 1, 1)
    return group_rows(real.expand(1, padded_height, width, 1), group_size, interlaced).squeeze(-1)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``(N, L, C)`` -> ``(N, heads, L, C / heads)``."""
    n, length, c = x.shape
    return x.view(n, length, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(N, heads, L, D)`` -> ``(N, L, heads * D)``."""
    n, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * d)


@dataclass
class AttentionWeights:
    """The softmax weights of one attention call over token groups, kept by an explicit-path layer.

    Attributes:
        probs: ``(B, G, heads, L, L)``: in group ``g``, how much position ``i`` attends to position ``j``.
        tokens: ``(G, L)`` long: the map token (row-major index ``y * W + x``) at each group
            position, ``-1`` for padding.
        num_tokens: ``H * W``.
    """

    probs: Tensor
    tokens: Tensor
    num_tokens: int

    def of_query(self, token: int) -> Tensor:
        """``(B, heads, H * W)``: the weights query ``token`` gives every token of the map, averaged
        over the groups that hold it (one, or two pales in the vanilla mode, whose outputs are averaged)."""
        groups, positions = (self.tokens == token).nonzero(as_tuple=True)
        rows = self.probs[:, groups, :, positions]                       # (k, B, heads, L)
        index = self.tokens[groups].masked_fill(self.tokens[groups] < 0, self.num_tokens)
        index = index[:, None, None, :].expand_as(rows)
        out = rows.new_zeros(*rows.shape[:3], self.num_tokens + 1).scatter_add_(-1, index, rows)
        return out[..., :-1].mean(0)


KeptWeights = Optional[List[AttentionWeights]]


def attend_in_groups(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], fused: bool,
                     keep: KeptWeights = None, tokens: Optional[Tensor] = None) -> Tensor:
    """Scaled dot-product attention of ``(N, heads, L, D)`` groups.

    ``fused``: through the measured-fastest kernel (:mod:`pale.models.attention_kernels`); otherwise
    the explicit ``softmax(q k^T / sqrt(D)) v``. With ``keep`` (a list) the explicit weights are
    appended to it as :class:`AttentionWeights` on the map tokens ``tokens`` ``(G, L)``.
    """
    if keep is not None:
        probs = attention_kernels.attention_probs(q, k, key_mask)
        num_tokens = int(tokens.max()) + 1   # every token of the map is in some group
        keep.append(AttentionWeights(probs.unflatten(0, (-1, tokens.shape[0])), tokens, num_tokens))
        return probs @ v
    if fused:
        return attention_kernels.attention(q, k, v, key_mask)
    return attention_kernels.explicit_attention(q, k, v, key_mask)


@torch.fx.wrap
def row_group_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, group_size: int, interlaced: bool,
                        fused: bool = True, keep: KeptWeights = None, token_ids: Optional[Tensor] = None) -> Tensor:
    """Multi-head self-attention inside groups of ``group_size`` rows, each spanning all columns.

    Args:
        q, k, v: ``(B, H, W, C)``; ``C`` divisible by ``num_heads``.
        fused, keep: see :func:`attend_in_groups`.
        token_ids: ``(H, W)`` ids of this map's tokens in the kept weights (default row-major).
    Returns:
        ``(B, H, W, C)``. Rows are padded to a multiple of ``group_size``; padded keys are masked
        and padded queries dropped, so the result depends only on the real tokens of each group.
    """
    b, h, w, _ = q.shape
    hp = padded_length(h, group_size)
    mask = tokens = None
    if traced_for_any_size() or hp != h:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, hp - h)) for t in (q, k, v))
        groups = hp // group_size
        mask = real_key_mask(h, hp, w, group_size, interlaced, q.device)
        mask = mask.unsqueeze(0).expand(b, groups, group_size * w).reshape(b * groups, 1, 1, group_size * w)
    if keep is not None:
        ids = token_ids if token_ids is not None else torch.arange(h * w, device=q.device).view(h, w)
        ids = F.pad(ids, (0, 0, 0, hp - h), value=-1).view(1, hp, w, 1)
        tokens = group_rows(ids, group_size, interlaced).squeeze(-1)
    qg, kg, vg = (split_heads(group_rows(t, group_size, interlaced), num_heads) for t in (q, k, v))
    out = attend_in_groups(qg, kg, vg, mask, fused, keep, tokens)
    return ungroup_rows(merge_heads(out), b, hp, group_size, w, interlaced)[:, :h]


@torch.fx.wrap
def column_group_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, group_size: int, interlaced: bool,
                           fused: bool = True, keep: KeptWeights = None) -> Tensor:
    """:func:`row_group_attention` over groups of columns. ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
    h, w = q.shape[1:3]
    token_ids = torch.arange(h * w, device=q.device).view(h, w).t() if keep is not None else None
    out = row_group_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              num_heads, group_size, interlaced, fused, keep, token_ids)
    return out.transpose(1, 2)


# --------------------------------------------------------------------------------------------
# PS-attention (Eq. 1-3)
# --------------------------------------------------------------------------------------------

@torch.fx.wrap
def ps_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, group_size: Tuple[int, int], interlaced: bool,
                 fused: bool = True, keep: KeptWeights = None) -> Tensor:
    """Parallel PS-attention on projected ``q, k, v`` (Eq. 1-3).

    The first ``C/2`` channels and ``num_heads/2`` heads attend inside groups of ``s_r`` rows, the
    last ``C/2`` channels and heads inside groups of ``s_c`` columns; the results are concatenated.

    Args:
        q, k, v: ``(B, H, W, C)``.
        group_size: ``(s_r, s_c)``.
        fused, keep: see :func:`attend_in_groups`.
    Returns:
        ``(B, H, W, C)``.
    """
    s_r, s_c = group_size
    heads = num_heads // 2
    if keep is None and not traced_for_any_size() and s_r == s_c and q.shape[1] == q.shape[2] \
            and q.shape[1] % s_r == 0:
        # Same result as the per-branch calls below (tested equal) in fewer kernels.
        return ps_attention_one_call(q, k, v, heads, s_r, interlaced, fused)
    (q_row, q_col), (k_row, k_col), (v_row, v_col) = (t.chunk(2, dim=-1) for t in (q, k, v))
    rows = row_group_attention(q_row, k_row, v_row, heads, s_r, interlaced, fused, keep)
    cols = column_group_attention(q_col, k_col, v_col, heads, s_c, interlaced, fused, keep)
    return torch.cat((rows, cols), dim=-1)


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
    return torch.stack(_branch_grid(x, group_size, interlaced)).view(2 * b * (p // group_size), group_size * p, c // 2)


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


def ps_attention_one_call(q: Tensor, k: Tensor, v: Tensor, heads_per_branch: int, group_size: int,
                          interlaced: bool, fused: bool = True) -> Tensor:
    """:func:`ps_attention` on a square map that needs no padding, as one attention call over both
    branches' groups: one grouping copy per input, one kernel, one copy out. Only for such maps
    (every stage of a 224x224 input with pale size 7), so it never computes masked keys.

    Args:
        q, k, v: ``(B, P, P, C)`` with ``P`` a multiple of ``group_size``.
    Returns:
        ``(B, P, P, C)``.
    """
    b, h, w, c = q.shape
    if h != w or h % group_size:
        raise ValueError(f"ps_attention_one_call needs a square map whose side is a multiple of the "
                         f"group size {group_size}, got {h}x{w}")
    qg, kg, vg = (split_heads(group_branches(t, group_size, interlaced), heads_per_branch) for t in (q, k, v))
    out = attend_in_groups(qg, kg, vg, None, fused)
    return ungroup_branches(merge_heads(out), b, group_size, interlaced)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

@torch.fx.wrap
def depthwise_conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """3x3 depthwise convolution with zero padding 1: ``(B, C, H, W)`` -> ``(B, C, H, W)``, ``weight``
    ``(C, 1, 3, 3)``.

    On maps smaller than the kernel (stage 4 of small inputs, e.g. 2x2 for 56x56 digits) oneDNN's
    padded depthwise kernel, forward and backward, is about 5x slower than padding first and
    convolving without padding; elsewhere padding inside the convolution is the faster
    (docs/performance.md). Same sums either way. Graphs traced for every size keep the padded call.
    """
    if not traced_for_any_size() and (x.shape[-2] < 3 or x.shape[-1] < 3):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), weight, bias, groups=weight.shape[0])
    return F.conv2d(x, weight, bias, padding=1, groups=weight.shape[0])


class SeparableProjection(nn.Module):
    """CvT-style separable projection: depthwise 3x3 conv (no bias) -> BatchNorm -> Linear.

    ``(B, H, W, C)`` -> ``(B, H, W, C_out)``.
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None, device: DeviceLike = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False, **dd)
        self.bn = nn.BatchNorm2d(dim, **dd)
        self.pw = nn.Linear(dim, out_dim or dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 3, 1, 2)
        if self.bn.training or self.bn.running_mean is None:
            x = self.bn(depthwise_conv3x3(x, self.dw.weight))
        else:
            # BatchNorm on running statistics is affine per channel: fold it into the conv. Written
            # out rather than torch.nn.utils.fuse_conv_bn_weights, which returns detached Parameters:
            # eval-mode BatchNorm with trained weights (frozen-BN fine-tuning) needs the gradients.
            scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
            bias = self.bn.bias - self.bn.running_mean * scale
            x = depthwise_conv3x3(x, self.dw.weight * scale.view(-1, 1, 1, 1), bias)
        return self.pw(x.permute(0, 2, 3, 1))


class GroupedAttention(nn.Module):
    """An attention layer whose tokens attend inside groups: separable q/k/v projections (Eq. 13),
    the grouped attention of its :class:`AttentionLayout` (:meth:`attend`), a linear output
    projection (Eq. 15). ``(B, H, W, C)`` -> ``(B, H, W, C)`` for any ``H, W >= 1``.

    Attributes:
        fused_attn: attend through the measured-fastest SDPA kernel (default
            ``timm.layers.use_fused_attn()``); False for the explicit ``softmax(q k^T) v``.
        keep_attn_weights: with ``fused_attn`` False, keep the last forward's softmax weights in
            ``attn_weights`` (one :class:`AttentionWeights` per branch, in head order).
    """

    def __init__(self, dim: int, num_heads: int, layout: AttentionLayout, device: DeviceLike = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if not isinstance(dim, int) or dim < 1 or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"dim and num_heads must be positive ints, got dim={dim!r}, num_heads={num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.mode = layout.mode
        self.group_size = layout.group_size
        self.interlaced = layout.interlaced
        self.direction = layout.direction
        self.fused_attn = use_fused_attn()
        self.keep_attn_weights = False
        self.attn_weights: KeptWeights = None
        self.q = SeparableProjection(dim, **dd)
        self.k = SeparableProjection(dim, **dd)
        self.v = SeparableProjection(dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def extra_repr(self) -> str:
        extra = f", direction={self.direction}" if self.direction else ""
        return f"dim={self.dim}, num_heads={self.num_heads}, mode={self.mode}, group_size={self.group_size}{extra}"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, keep: KeptWeights) -> Tensor:
        """The layout's attention on projected ``q, k, v`` of shape ``(B, H, W, C)``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x = check_token_map(x, self.dim, type(self).__name__)
        keep: KeptWeights = [] if self.keep_attn_weights and not self.fused_attn else None
        out = self.attend(self.q(x), self.k(x), self.v(x), keep)
        if keep is not None:
            self.attn_weights = keep
        return self.proj(out)


#: Attention layer class per mode; :func:`create_attention` builds from it.
ATTENTION_LAYERS: Dict[str, Type[GroupedAttention]] = {}


def register_attention(*modes: str) -> Callable[[Type[GroupedAttention]], Type[GroupedAttention]]:
    """Class decorator: build ``modes`` with this :class:`GroupedAttention` subclass."""
    def register(cls: Type[GroupedAttention]) -> Type[GroupedAttention]:
        for mode in modes:
            ATTENTION_LAYERS[mode] = cls
        return cls
    return register


@register_attention(*TWO_BRANCH_MODES)
class PSAttention(GroupedAttention):
    """Pale-shaped self-attention, parallel form (Eq. 1-3): :func:`ps_attention` between separable
    q/k/v projections and a linear output projection.

    With the layout of ``axial`` (pale size 1) or ``cross_shaped`` (contiguous stripes) it computes
    those modes: the same operator with other groups.
    """

    def __init__(self, dim: int, num_heads: int, layout: AttentionLayout = attention_layout("parallel"),
                 device: DeviceLike = None, dtype: Optional[torch.dtype] = None):
        super().__init__(dim, num_heads, layout, device=device, dtype=dtype)
        if layout.mode not in TWO_BRANCH_MODES:
            raise ValueError(f"PSAttention computes the modes {TWO_BRANCH_MODES}, not {layout.mode!r}")
        if num_heads % 2:
            raise ValueError(f"mode {layout.mode!r} splits heads between a row and a column branch: "
                             f"num_heads={num_heads} must be even")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, keep: KeptWeights) -> Tensor:
        return ps_attention(q, k, v, self.num_heads, self.group_size, self.interlaced, self.fused_attn, keep)


def create_attention(dim: int, num_heads: int, pale_size: PairOrInt = 7, mode: AttnMode = "parallel",
                     direction: Optional[str] = None, stripe_width: PairOrInt = 7, device: DeviceLike = None,
                     dtype: Optional[torch.dtype] = None) -> GroupedAttention:
    """The attention layer of ``mode`` (:data:`ATTN_MODES`) with its :func:`attention_layout`."""
    layout = attention_layout(mode, pale_size, stripe_width, direction)
    return ATTENTION_LAYERS[mode](dim, num_heads, layout, device=device, dtype=dtype)


class ConvPosEnc(nn.Module):
    """Conditional position encoding (CPE) with its residual: ``x + DWConv3x3(x)``, ``(B, H, W, C)`` -> same.

    The residual is folded into the convolution (its centre tap plus one), which gives the same
    result and gradients in one kernel instead of a convolution and an addition. That identity kernel
    is a buffer that checkpoints do not hold: after ``to_empty()`` it is refilled by
    :meth:`init_non_persistent_buffers` (which timm's ``reinit_non_persistent_buffers`` calls) or
    :meth:`PaleTransformer.init_weights`.
    """

    def __init__(self, dim: int, device: DeviceLike = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, device=device, dtype=dtype)
        self.register_buffer("identity", torch.empty_like(self.proj.weight), persistent=False)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """Fill the identity kernel: one at the centre tap, zero elsewhere."""
        with torch.no_grad():
            self.identity.zero_()[:, :, 1, 1] = 1.0

    def reset_parameters(self) -> None:
        # only this module's own state: ``proj`` resets itself
        self.init_non_persistent_buffers()

    def forward(self, x: Tensor) -> Tensor:
        weight = self.proj.weight + self.identity
        return depthwise_conv3x3(x.permute(0, 3, 1, 2), weight, self.proj.bias).permute(0, 2, 3, 1)


class ConvPatchMerging(nn.Module):
    """Overlapping strided convolution then LayerNorm: ``(B, H, W, C_in)`` -> ``(B, H', W', C_out)``."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, stride: int,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm, device: DeviceLike = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size, stride, padding=(kernel_size - stride + 1) // 2, **dd)
        self.norm = norm_layer(out_dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class DeepConvStem(nn.Module):
    """Four 3x3 conv-BatchNorm-ReLU layers of ``C/2, C/2`` channels, a 2x2 max-pool, ``C, C`` channels, then
    a 1x1 convolution and LayerNorm: ``(B, H, W, C_in)`` -> ``(B, ceil(H/2), ceil(W/2), C)``.

    Not the paper's stem (a 7x7 stride-4 convolution, Sec. 3.3): a stack of 3x3 convolutions in front of the
    transformer, as Xiao et al. (2021, "Early convolutions help transformers see better") propose, with
    output stride 2, for small images. On 3500 MNIST digits at 28x28 it validated better than the paper's
    stem on 56x56 upsampled digits (docs/training.md, "A seventh search")."""

    def __init__(self, in_chans: int, dim: int, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 device: DeviceLike = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        half = max(dim // 2, 1)
        self.convs = nn.Sequential(ConvNormAct(in_chans, half, 3, **dd), ConvNormAct(half, half, 3, **dd),
                                   nn.MaxPool2d(2, ceil_mode=True), ConvNormAct(half, dim, 3, **dd),
                                   ConvNormAct(dim, dim, 3, **dd))
        self.pointwise = nn.Conv2d(dim, dim, 1, **dd)
        self.norm = norm_layer(dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.pointwise(self.convs(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1))


def resample_pos_embed(table: Tensor, size: Sequence[int]) -> Tensor:
    """A ``(1, Ht, Wt, C)`` position table resized bicubically (antialiased) to ``(1, *size, C)``, in
    the table's precision (float32 for half precisions).

    Not timm's ``resample_abs_pos_embed_nhwc``: it interpolates float64 tables in float32, and its
    equal-size shortcut would be fixed into a ``torch.jit.trace`` graph.
    """
    dtype = table.dtype if table.dtype in (torch.float32, torch.float64) else torch.float32
    resized = F.interpolate(table.permute(0, 3, 1, 2).to(dtype), size=list(size), mode="bicubic", antialias=True)
    return resized.permute(0, 2, 3, 1).to(table.dtype)


@torch.fx.wrap
def add_pos_embed(x: Tensor, table: Tensor) -> Tensor:
    """``x`` ``(B, H, W, C)`` plus the ``(1, Ht, Wt, C)`` table, resized to ``(H, W)`` when the sizes
    differ (and always when traced for any size, so that the graph resizes)."""
    if traced_for_any_size() or table.shape[1:3] != x.shape[1:3]:
        table = resample_pos_embed(table, x.shape[1:3])
    return x + table.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Block -> Stage -> Model
# --------------------------------------------------------------------------------------------

class PaleBlock(nn.Module):
    """CPE, then pre-norm attention and MLP with residuals and stochastic depth (Eq. 6-8).

    ``(B, H, W, C)`` -> ``(B, H, W, C)``. The attention layer comes from :func:`create_attention`.
    """

    def __init__(self, dim: int, num_heads: int, pale_size: PairOrInt = 7, attn_mode: AttnMode = "parallel",
                 direction: Optional[str] = None, stripe_width: PairOrInt = 7,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, use_cpe: bool = True,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm, act_layer: Callable[..., nn.Module] = nn.GELU,
                 device: DeviceLike = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cpe = ConvPosEnc(dim, **dd) if use_cpe else None
        self.norm1 = norm_layer(dim, **dd)
        self.attn = create_attention(dim, num_heads, pale_size, attn_mode, direction, stripe_width, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.cpe is not None:
            x = self.cpe(x)  # x + DWConv(x)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PaleStage(nn.Module):
    """Patch merging (stride 2) when ``downsample``, then the learned position table if any, then
    ``depth`` blocks. NHWC in and out.

    Args:
        pos_embed_size: ``(h, w)`` of a learned absolute position table (APE) added to the merged
            map, resized bicubically for other map sizes; None for no table.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, downsample: bool,
                 pale_size: PairOrInt = 7, attn_mode: AttnMode = "parallel", stripe_width: PairOrInt = 7,
                 mlp_ratio: float = 4.0, drop_path: Sequence[float] = (), use_cpe: bool = True,
                 pos_embed_size: Optional[Tuple[int, int]] = None,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm, device: DeviceLike = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.downsample = ConvPatchMerging(in_dim, dim, 3, 2, norm_layer, **dd) if downsample else nn.Identity()
        self.pos_embed: Optional[nn.Parameter] = None
        if pos_embed_size is not None:
            self.pos_embed = nn.Parameter(torch.empty(1, *pos_embed_size, dim, **dd))
        self.reset_parameters()
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.Sequential(*[
            PaleBlock(dim, num_heads, pale_size, attn_mode, block_direction(attn_mode, i), stripe_width,
                      mlp_ratio=mlp_ratio, drop_path=drop_path[i], use_cpe=use_cpe, norm_layer=norm_layer, **dd)
            for i in range(depth)])

    def reset_parameters(self) -> None:
        # only this module's own parameter, the position table: truncated normal, std 0.02 (as ViT's)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.pos_embed is not None:
            x = add_pos_embed(x, self.pos_embed)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class PaleTransformer(nn.Module):
    """Pale Transformer: conv stem (7x7, stride 4, or :class:`DeepConvStem`), four stages of Pale blocks with overlapping-conv
    patch merging between them, final LayerNorm, global average pooling and a linear head.

    Takes NCHW images of any size >= 3x3; works internally in NHWC (``output_fmt``).

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
        stem_type: ``'overlap'``, the paper's 7x7 stride-4 convolution, or ``'deep'``,
            :class:`DeepConvStem` (3x3 convolutions, stride 2: every stage's map is twice as large).
        weight_init: ``''`` initialises the weights (:meth:`init_weights`); ``'skip'`` leaves each layer
            as its constructor made it, for a model whose weights are loaded or initialised later.
        device, dtype: where and in which type every parameter and buffer is created; ``device='meta'``
            builds without memory, then ``to_empty(device=...)`` and :meth:`init_weights` materialise it.

    The resolved settings are attributes (``embed_dims``, ``depths``, ``num_heads``, ``pale_sizes``
    and ``stripe_widths`` as pairs per stage, ``attn_mode``, ``mlp_ratio``, ``pos_embed_mode``, ``img_size``):
    :mod:`pale.complexity` reads them.
    """

    output_fmt = "NHWC"

    def __init__(self, img_size: PairOrInt = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dims: Sequence[int] = (64, 128, 256, 512),
                 depths: Sequence[int] = (2, 2, 16, 2), num_heads: Sequence[int] = (2, 4, 8, 16),
                 pale_size: Any = 7, attn_mode: AttnMode = "parallel", stripe_width: Any = 7,
                 mlp_ratio: float = 4.0, pos_embed: str = "cpe", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 stem_type: str = "overlap", weight_init: str = "", device: DeviceLike = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if weight_init not in ("", "skip"):
            raise ValueError(f"weight_init must be '' (initialise) or 'skip', got {weight_init!r}")
        if stem_type not in STEM_TYPES:
            raise ValueError(f"unknown stem type {stem_type!r}; expected one of {STEM_TYPES}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"unknown position encoding {pos_embed!r}; expected one of {POS_EMBEDS}")
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"unknown attention mode {attn_mode!r}; expected one of {ATTN_MODES}")
        num_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == num_stages):
            raise ValueError(f"embed_dims {tuple(embed_dims)}, depths {tuple(depths)} and num_heads "
                             f"{tuple(num_heads)} must have one entry per stage")
        self.embed_dims, self.depths, self.num_heads = tuple(embed_dims), tuple(depths), tuple(num_heads)
        self.pale_sizes = tuple(as_pair(p, "pale_size") for p in per_stage(pale_size, num_stages, "pale_size"))
        self.stripe_widths = tuple(as_pair(s, "stripe_width")
                                   for s in per_stage(stripe_width, num_stages, "stripe_width"))
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = as_pair(img_size, "img_size")
        self.attn_mode = attn_mode
        self.mlp_ratio = mlp_ratio
        self.pos_embed_mode = pos_embed
        self.stem_type = stem_type
        self.num_features = self.head_hidden_size = embed_dims[-1]

        if stem_type == "deep":
            self.stem, reduction = DeepConvStem(in_chans, embed_dims[0], norm_layer, **dd), 2
        else:
            self.stem, reduction = ConvPatchMerging(in_chans, embed_dims[0], 7, 4, norm_layer, **dd), 4
        grids = stage_grids(self.img_size, num_stages, stem_type) if pos_embed == "ape" else [None] * num_stages
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages, in_dim = [], embed_dims[0]
        self.feature_info = []
        for i in range(num_stages):
            stages.append(PaleStage(
                in_dim, embed_dims[i], depths[i], num_heads[i], downsample=i > 0,
                pale_size=self.pale_sizes[i], attn_mode=attn_mode, stripe_width=self.stripe_widths[i],
                mlp_ratio=mlp_ratio, drop_path=dpr[i], use_cpe=pos_embed == "cpe", pos_embed_size=grids[i],
                norm_layer=norm_layer, **dd))
            reduction = reduction * 2 if i > 0 else reduction
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
            in_dim = embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool,
                                   drop_rate=drop_rate, input_fmt=self.output_fmt, **dd)
        if weight_init != "skip":
            self.init_weights(needs_reset=False)

    @torch.jit.ignore
    def init_weights(self, needs_reset: bool = True) -> None:
        """Initialise every weight in place: linear layers truncated normal (std 0.02) with zero bias;
        with ``needs_reset`` also every other layer from its own ``reset_parameters()``: convolutions
        PyTorch's default (Kaiming-uniform, as in Swin and CSWin), norms unit weight and zero bias,
        BatchNorm's running statistics, the learned position tables (truncated normal, std 0.02) and
        the CPE's identity kernel.

        ``needs_reset=False`` is for a model just built on a real device, whose layers initialised
        themselves; ``True`` (after ``to_empty()``) gives a model built on ``meta`` the same
        initialisation as a normal build.
        """
        self.apply(functools.partial(self._init_weights, needs_reset=needs_reset))

    def _init_weights(self, module: nn.Module, needs_reset: bool = True) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif needs_reset and module is not self and hasattr(module, "reset_parameters"):
            module.reset_parameters()

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
        like = next(self.stem.parameters())  # the head may hold no parameter (num_classes 0)
        self.num_classes = num_classes
        self.head.in_features = self.num_features
        self.head.reset(num_classes, pool_type=global_pool)
        self.head.to(like.device, like.dtype)  # older timm builds the new layer on the default device

    def set_input_size(self, img_size: PairOrInt) -> None:
        """Set the training image size ``img_size``. PS-attention takes any input size as it is; with
        ``pos_embed='ape'`` each stage's learned table is resampled (:func:`resample_pos_embed`) to that
        size's grid, so that inputs of that size add it as it is."""
        self.img_size = as_pair(img_size, "img_size")
        if self.pos_embed_mode == "ape":
            for stage, grid in zip(self.stages, stage_grids(self.img_size, len(self.stages), self.stem_type)):
                table = stage.pos_embed
                stage.pos_embed = nn.Parameter(resample_pos_embed(table.detach(), grid), table.requires_grad)
        if update_model_input_size is not None:
            update_model_input_size(self, self.img_size)

    def _embed(self, x: Tensor) -> Tensor:
        """NCHW image -> NHWC stem tokens."""
        x = check_image_batch(x, self.in_chans)
        return self.stem(x.permute(0, 2, 3, 1))

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> normed final NHWC map ``(B, H/32, W/32, C4)`` (``H/16`` with the deep stem)."""
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
        """Stage outputs as NCHW maps (strides 4, 8, 16, 32; 2, 4, 8, 16 with the deep stem), and optionally
        the final features.

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
        """Drop the stages after the last of ``indices`` (and the norm and head if asked). When stages
        are dropped the final norm and the head go too: they are sized for the last stage."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
        if prune_head or prune_end:
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
            value = resample_pos_embed(value, own[name].shape[1:3])
        out[name] = value
    return out


def _create_pale(variant: str, pretrained: bool = False, **kwargs: Any) -> PaleTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs["depths"]))))
    if kwargs.get("stem_type") == "deep":  # the input convolution timm adapts when in_chans is not 3; stride 16
        kwargs["pretrained_cfg_overlay"] = {"first_conv": "stem.convs.0.conv", "pool_size": (14, 14),
                                            **(kwargs.get("pretrained_cfg_overlay") or {})}
    return build_model_with_cfg(
        PaleTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    # No released weights exist: pretrained=True needs pretrained_cfg_overlay=dict(file=...).
    # Evaluation as the paper's (Sec. 4.1, following DeiT and Swin): resize to 256x256, centre crop 224.
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "crop_mode": "squash", "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj", "classifier": "head.fc", "license": "apache-2.0",
        "paper_name": "Pale Transformer: A General Vision Transformer Backbone with Pale-Shaped Attention",
        **kwargs,
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
