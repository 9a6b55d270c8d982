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

Attention modes are registered (:func:`register_attention_mode`): each names its layer class, its
group size, its analytic cost and what tracing it allows, and everything that lists modes (the
model's arguments, :mod:`pale.complexity`, :mod:`pale.visualize`, the exporters) reads the registry.

Tracing: every function whose control flow depends on tensor sizes is a leaf for ``torch.fx``
(``torch.fx.wrap``), so FX graphs run it as it is at any size. Under ``torch.jit.trace`` and
``torch.export`` the attention always pads and masks (by zero rows when nothing needs padding), so
one trace serves every input size.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (ClassifierHead, ConvNormAct, DropPath, Mlp, calculate_drop_path_rates,
                         to_2tuple, trunc_normal_, use_fused_attn)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

try:  # newer timm records a model's resize for save_for_hf; older timm has nothing to record
    from timm.models._input import update_model_input_size
except ImportError:
    update_model_input_size = None

from . import attention_kernels

__all__ = ["PSAttention", "GroupedAttention", "PaleBlock", "PaleStage", "PaleTransformer", "AttentionLayout",
           "AttentionMode", "ATTENTION_MODES", "ATTN_MODES", "POS_EMBEDS", "STEM_TYPES", "DeepConvStem",
           "attention_layout", "attention_mode", "block_direction", "create_attention", "register_attention_mode",
           "unregister_attention_mode", "padded_length", "pale_count", "stage_grids", "as_pair", "per_stage"]

#: The name of a registered attention mode (:data:`ATTN_MODES`).
AttnMode = str
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
        mode: a registered mode (:data:`ATTN_MODES`).
        group_size: ``(s_r, s_c)``, rows per row group and columns per column group.
        interlaced: interlaced groups (PS-attention, Eq. 1) or contiguous stripes (CSWin).
        direction: ``'row'`` or ``'column'`` for a directed mode (``sequential``), else None.
    """

    mode: str
    group_size: Tuple[int, int]
    interlaced: bool
    direction: Optional[str] = None


@dataclass(frozen=True)
class AttentionMode:
    """One attention mode: the layer that computes it and what the rest of the package derives from it
    (layouts, the analytic cost in :mod:`pale.complexity`, the pictures of :mod:`pale.visualize`, the
    exporters' limits). Registered with :func:`register_attention_mode`.

    Attributes:
        name: the ``attn_mode`` value.
        layer: the :class:`GroupedAttention` subclass that computes it. Its ``branch_names`` say how
            channels and heads are split (``('row', 'column')``: half each, Eq. 1-3; ``('all',)``: one
            branch) and how :mod:`pale.visualize` colours the tokens each branch reaches.
        group_size: ``(pale_size, stripe_width) -> (s_r, s_c)``, checked (:func:`as_pair`).
        matmul_macs: ``(layout, h, w, c, padded) -> int``, the multiply-adds of both attention matmuls
            (q·k and attention·v) of one layer on an ``h x w x c`` map: with the padding the code
            adds, or (``padded=False``) the paper's formula on the real map.
        interlaced: interlaced groups (PS-attention, Eq. 1) or contiguous stripes (CSWin).
        directed: attends along one direction, rows and columns alternating from block to block
            (:func:`block_direction`).
        any_size_graph: one traced or exported graph serves every input size; False where the
            grouping is a Python choice on the map size, which a trace fixes at its example's.
    """

    name: str
    layer: Type["GroupedAttention"]
    group_size: Callable[[Any, Any], Tuple[int, int]]
    matmul_macs: Callable[[AttentionLayout, int, int, int, bool], int]
    interlaced: bool = True
    directed: bool = False
    any_size_graph: bool = True


#: The registered attention modes by name (:func:`register_attention_mode`).
ATTENTION_MODES: Dict[str, AttentionMode] = {}


class _ModeNames(SequenceABC):
    """The names of the registered modes in registration order, a read-only sequence that follows
    :data:`ATTENTION_MODES` (a mode registered later is in it)."""

    def __getitem__(self, index: Any) -> Any:
        return tuple(ATTENTION_MODES)[index]

    def __len__(self) -> int:
        return len(ATTENTION_MODES)

    def __repr__(self) -> str:
        return repr(tuple(ATTENTION_MODES))


ATTN_MODES: Sequence[str] = _ModeNames()


def register_attention_mode(mode: AttentionMode) -> AttentionMode:
    """Make ``mode`` available to ``PaleTransformer(attn_mode=...)``, :func:`create_attention`, the
    cost model and the pictures."""
    if mode.name in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode.name!r} is already registered")
    ATTENTION_MODES[mode.name] = mode
    return mode


def unregister_attention_mode(name: str) -> AttentionMode:
    """Remove a registered mode (models built with it keep working) and return it."""
    mode = attention_mode(name)
    del ATTENTION_MODES[name]
    return mode


def attention_mode(name: str) -> AttentionMode:
    """The registered mode ``name``; a clear error for any other."""
    mode = ATTENTION_MODES.get(name) if isinstance(name, str) else None
    if mode is None:
        raise ValueError(f"unknown attention mode {name!r}; expected one of {', '.join(ATTN_MODES)}")
    return mode


def block_direction(mode: str, block_index: int) -> Optional[str]:
    """The direction of block ``block_index`` of a stage: a directed mode (``sequential``) alternates
    row and column attention from block to block (starting with rows); the other modes have none."""
    return ("row" if block_index % 2 == 0 else "column") if attention_mode(mode).directed else None


def attention_layout(mode: str, pale_size: PairOrInt = 7, stripe_width: PairOrInt = 7,
                     direction: Optional[str] = None) -> AttentionLayout:
    """The groups of ``mode``: its group size from the pale size or the stripe width (pale size for
    PS-attention, ``(1, 1)`` for axial, stripe width for cross-shaped); a directed mode attends along
    ``direction`` (default rows)."""
    entry = attention_mode(mode)
    if entry.directed:
        direction = direction or "row"
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'row' or 'column', got {direction!r}")
    elif direction is not None:
        directed = " or ".join(f"mode={name!r}" for name, m in ATTENTION_MODES.items() if m.directed)
        raise ValueError(f"direction is only used by {directed or 'directed modes'}, not {mode!r}")
    return AttentionLayout(mode, entry.group_size(pale_size, stripe_width), entry.interlaced, direction)


def pale_group_size(pale_size: PairOrInt, stripe_width: PairOrInt) -> Tuple[int, int]:
    """The group size of PS-attention: the pale size ``(s_r, s_c)``."""
    return as_pair(pale_size, "pale_size")


def row_groups_macs(h: int, w: int, c: int, group_size: int, padded: bool) -> int:
    """Both matmuls of attention inside groups of ``group_size`` rows spanning all ``w`` columns, on
    ``c`` channels: ``Hp / s`` groups of ``s w`` tokens, ``2 (Hp/s) (s w)² c`` (Eq. 14 per branch;
    ``Hp = h`` without ``padded``)."""
    hp = padded_length(h, group_size) if padded else h
    return 2 * hp * group_size * w * w * c


def two_branch_macs(layout: AttentionLayout, h: int, w: int, c: int, padded: bool) -> int:
    """Attention matmuls of :class:`PSAttention`: half the channels in each branch (Eq. 14,
    ``hw²c s_r + h²wc s_c`` without padding)."""
    s_r, s_c = layout.group_size
    return row_groups_macs(h, w, c // 2, s_r, padded) + row_groups_macs(w, h, c - c // 2, s_c, padded)


# --------------------------------------------------------------------------------------------
# Checks and tracing
# --------------------------------------------------------------------------------------------

def traced_for_any_size() -> bool:
    """Whether this call is being recorded into a graph that must serve every input size:
    ``torch.jit.trace`` (and the TorchScript ONNX exporter) or ``torch.export`` (and the dynamo
    ONNX exporter). Size-dependent shortcuts are then left out of the graph."""
    return torch.jit.is_tracing() or attention_kernels.is_exporting()


def eager_cache(make: Callable[..., Tensor]) -> Callable[..., Any]:
    """``make`` (a function of hashable sizes and a device that builds constant tensors: indices,
    masks), memoised per argument tuple in eager calls (the 64 most recent). Traced, exported and
    compiled calls run ``make`` itself: no tensor made during a capture outlives it. Cached tensors
    are made outside inference mode, so autograd can use them whatever mode the first call ran in."""

    @functools.lru_cache(maxsize=64)
    def cached(*args: Any) -> Any:
        with torch.inference_mode(False):
            return make(*args)

    @functools.wraps(make)
    def call(*args: Any) -> Any:
        if traced_for_any_size() or torch.compiler.is_compiling():
            return make(*args)
        return cached(*args)

    call.cache_info, call.cache_clear = cached.cache_info, cached.cache_clear  # type: ignore[attr-defined]
    return call


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


@eager_cache
def batch_key_mask(batch: int, height: int, padded_height: int, width: int, group_size: int, interlaced: bool,
                   device: torch.device) -> Tensor:
    """:func:`real_key_mask` for every group of a batch, as attention takes it: ``(B G, 1, 1, group_size * W)``
    bool (built once per size in eager calls: :func:`eager_cache`)."""
    groups, length = padded_height // group_size, group_size * width
    mask = real_key_mask(height, padded_height, width, group_size, interlaced, device)
    return mask.unsqueeze(0).expand(batch, groups, length).reshape(batch * groups, 1, 1, length)


# torch.export keeps every size symbolic and specialises the graph on any size it cannot prove to
# be 1 or more than 1 (even a contiguity check asks). ``G`` can be either in an input range (stage 4
# of a 64..512 input has one group or three), so on the export path no tensor has a dimension of
# ``G`` alone: the groups and heads share one dimension, and the tokens are gathered by index from
# a flat view (a view that merges symbolic dimensions asks the same questions). Nor does a view split
# a dimension into symbolic sizes: it must prove the division exact, which sympy often cannot (it
# distributes ``2 (G + 1)`` into ``2 G + 2`` and no longer sees the factor); the gathers' indices have
# the result's shape instead.

def _flat(x: Tensor, *shape: int) -> Tensor:
    """``x`` viewed as ``shape`` through ``(numel / C, C)``, ``C`` the last entry of ``shape``."""
    return x.contiguous().flatten().view(-1, shape[-1]).view(*shape)


def _export_rows(groups: int, num_heads: int, group_size: int, interlaced: bool, device: torch.device) -> Tensor:
    """``(G heads, s, 1)``: the padded map's row at each (group and head, row within the group)."""
    group = (torch.arange(groups * num_heads, device=device) // num_heads)[:, None, None]
    within = torch.arange(group_size, device=device)[None, :, None]
    return within * groups + group if interlaced else group * group_size + within


def export_group_index(groups: int, num_heads: int, group_size: int, width: int, interlaced: bool,
                       device: torch.device) -> Tensor:
    """For each element of the exported groups ``(G heads, s W)`` (group and head; row within the group,
    then column), its index in the map's ``(Hp W heads)`` flat order. (Products, broadcasts and one
    concatenation of the ``s`` rows: the ONNX exporter takes no remainder by a symbolic size, and a view
    that merged ``(s, W)`` would ask whether ``s W`` exceeds ``s``.)"""
    rows = _export_rows(groups, num_heads, group_size, interlaced, device)
    head = (torch.arange(groups * num_heads, device=device) % num_heads)[:, None, None]
    col = torch.arange(width, device=device)[None, None, :]
    return torch.cat(((rows * width + col) * num_heads + head).unbind(1), dim=1)


def export_group_rows(x: Tensor, num_heads: int, index: Tensor) -> Tensor:
    """:func:`group_rows` then :func:`split_heads` as torch.export keeps them at every size:
    ``(B, Hp, W, C)`` -> ``(B, G heads, s W, C / heads)``; ``index`` of :func:`export_group_index`."""
    b, hp, w, c = x.shape
    return _flat(x, b, hp * w * num_heads, c // num_heads)[:, index]


def export_ungroup_rows(out: Tensor, num_heads: int, height: int, group_size: int, width: int,
                        interlaced: bool) -> Tensor:
    """Inverse of :func:`export_group_rows`, padded rows dropped: ``(B, G heads, s W, D)`` -> ``(B, H, W, heads D)``."""
    (b, n, length, d), device = out.shape, out.device
    position = export_group_index(n // num_heads, num_heads, group_size, width, interlaced, device).flatten()
    inverse = torch.empty_like(position).scatter_(0, position, torch.arange(position.numel(), device=device))
    # the real rows' (row, column, head) in the flat order, first: (H, W, heads)
    real = ((torch.arange(height, device=device)[:, None, None] * width + torch.arange(width, device=device)[:, None])
            * num_heads + torch.arange(num_heads, device=device))
    return _flat(out, b, n * length, d)[:, inverse[real]].flatten(3, 4)


def export_key_mask(index: Tensor, height: int, width: int, num_heads: int) -> Tensor:
    """The key mask of the groups gathered with ``index`` (:func:`export_group_index`): ``(1, G heads, 1,
    s W)``, True on real rows (whose flat positions come before the first padded row's)."""
    return (index < height * width * num_heads)[None, :, None, :]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``(N, L, C)`` -> ``(N, heads, L, C / heads)``."""
    n, length, c = x.shape
    return x.view(n, length, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(N, heads, L, D)`` -> ``(N, L, heads * D)``."""
    n, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * d)


#: ``q, k, v`` in groups, each ``(N, heads, L, D)``, and the key mask ``(N, 1, 1, L)`` (True on real
#: tokens; None when no group holds padding).
GroupedQKV = Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]


@torch.fx.wrap
def attend_in_groups(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """Scaled dot-product attention of ``(N, heads, L, D)`` groups through the kernel of
    :func:`pale.models.attention_kernels.attention` (the fused path)."""
    return attention_kernels.attention(q, k, v, key_mask)


@torch.fx.wrap
def attention_weights(q: Tensor, k: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """The explicit path's ``softmax(q k^T / sqrt(D))`` of ``(N, heads, L, D)`` groups, padded keys
    masked: ``(N, heads, L, L)``."""
    return attention_kernels.attention_probs(q, k, key_mask)


@torch.fx.wrap
def group_lines(q: Tensor, k: Tensor, v: Tensor, num_heads: int, group_size: int, interlaced: bool,
                direction: str) -> GroupedQKV:
    """``q, k, v`` in groups of ``group_size`` rows spanning all columns (``direction='row'``), or of
    columns spanning all rows.

    Args:
        q, k, v: ``(B, H, W, C)``; ``C`` divisible by ``num_heads``.
    Returns:
        :data:`GroupedQKV`: ``(B G, heads, s W, C / heads)`` in the token order of :func:`group_rows`
        (columns: of the transposed map); under torch.export ``(B, G heads, s W, C / heads)``
        (:func:`export_group_rows`). Rows are padded to a multiple of ``group_size`` and the padded
        keys masked, so each group's result depends only on its real tokens.
    """
    if direction == "column":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    b, h, w, _ = q.shape
    hp = padded_length(h, group_size)
    # Groups of one row never need padding; graphs for every size always pad the others.
    padded = group_size > 1 and (traced_for_any_size() or hp != h)
    if padded:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, hp - h)) for t in (q, k, v))
    if attention_kernels.is_exporting():
        index = export_group_index(hp // group_size, num_heads, group_size, w, interlaced, q.device)
        mask = export_key_mask(index, h, w, num_heads) if padded else None
        qg, kg, vg = (export_group_rows(t, num_heads, index) for t in (q, k, v))
        return qg, kg, vg, mask
    mask = batch_key_mask(b, h, hp, w, group_size, interlaced, q.device) if padded else None
    qg, kg, vg = (split_heads(group_rows(t, group_size, interlaced), num_heads) for t in (q, k, v))
    return qg, kg, vg, mask


@torch.fx.wrap
def ungroup_lines(out: Tensor, like: Tensor, group_size: int, interlaced: bool, direction: str) -> Tensor:
    """Inverse of :func:`group_lines` on the attention output: ``(B G, heads, s W, D)`` -> the
    ``(B, H, W, heads D)`` map of ``like`` (a ``(B, H, W, *)`` tensor), padded queries dropped."""
    b, h, w = like.shape[:3]
    if direction == "column":
        h, w = w, h
    if attention_kernels.is_exporting():  # gathered, not sliced (the exporter cannot prove h <= hp either)
        out = export_ungroup_rows(out, like.shape[-1] // out.shape[-1], h, group_size, w, interlaced)
    else:
        out = ungroup_rows(merge_heads(out), b, padded_length(h, group_size), group_size, w, interlaced)[:, :h]
    return out.transpose(1, 2) if direction == "column" else out


def row_group_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, group_size: int, interlaced: bool) -> Tensor:
    """Multi-head self-attention inside groups of ``group_size`` rows, each spanning all columns, as
    one function (fused path): :func:`group_lines`, :func:`attend_in_groups`, :func:`ungroup_lines`.
    ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
    qg, kg, vg, mask = group_lines(q, k, v, num_heads, group_size, interlaced, "row")
    return ungroup_lines(attend_in_groups(qg, kg, vg, mask), q, group_size, interlaced, "row")


def column_group_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, group_size: int, interlaced: bool) -> Tensor:
    """:func:`row_group_attention` over groups of columns. ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
    qg, kg, vg, mask = group_lines(q, k, v, num_heads, group_size, interlaced, "column")
    return ungroup_lines(attend_in_groups(qg, kg, vg, mask), q, group_size, interlaced, "column")


# --------------------------------------------------------------------------------------------
# PS-attention (Eq. 1-3): both branches in one call on square maps that need no padding
# --------------------------------------------------------------------------------------------

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
                          interlaced: bool) -> Tensor:
    """Parallel PS-attention on a square map that needs no padding, as one attention call over both
    branches' groups: one grouping copy per input, one kernel, one copy out. Only for such maps
    (every stage of a 224x224 input with pale size 7), so it never computes masked keys.

    Args:
        q, k, v: ``(B, P, P, C)`` with ``P`` a multiple of ``group_size``.
    Returns:
        ``(B, P, P, C)``: the row branch of the first ``C/2`` channels and heads, then the column
        branch of the rest, as :class:`PSAttention` computes them one branch at a time.
    """
    b, h, w, c = q.shape
    if h != w or h % group_size:
        raise ValueError(f"ps_attention_one_call needs a square map whose side is a multiple of the "
                         f"group size {group_size}, got {h}x{w}")
    qg, kg, vg = (split_heads(group_branches(t, group_size, interlaced), heads_per_branch) for t in (q, k, v))
    out = attend_in_groups(qg, kg, vg, None)
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
    attention inside the groups of its :class:`AttentionLayout`, a linear output projection (Eq. 15).
    ``(B, H, W, C)`` -> ``(B, H, W, C)`` for any ``H, W >= 1``.

    Subclasses name their branches (``branch_names``: channels and heads are split evenly between
    them, in order) and say how each groups ``q, k, v`` (:meth:`group`) and puts its output back
    (:meth:`ungroup`); :meth:`attend` runs every branch between the two.

    Attributes:
        fused_attn: attend through :func:`pale.models.attention_kernels.attention` (default
            ``timm.layers.use_fused_attn()``); False for the explicit ``softmax(q k^T) v``, whose
            weights ``(B G, heads, L, L)`` pass through ``attn_probs[branch]``, an identity a forward
            hook can read (as ``timm.utils.AttentionExtract(method='hook')`` does).
        branches: branch name -> (channel slice, heads).
    """

    branch_names: Tuple[str, ...] = ("all",)

    def __init__(self, dim: int, num_heads: int, layout: AttentionLayout, device: DeviceLike = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if not isinstance(dim, int) or dim < 1 or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"dim and num_heads must be positive ints, got dim={dim!r}, num_heads={num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        layer = attention_mode(layout.mode).layer
        if not isinstance(self, layer):
            raise ValueError(f"mode {layout.mode!r} is computed by {layer.__name__}, not {type(self).__name__}")
        self.dim = dim
        self.num_heads = num_heads
        self.mode = layout.mode
        self.group_size = layout.group_size
        self.interlaced = layout.interlaced
        self.direction = layout.direction
        self.fused_attn = use_fused_attn()
        n = len(self.branch_names)
        self.branches: Dict[str, Tuple[slice, int]] = {
            name: (slice(i * dim // n, (i + 1) * dim // n), num_heads // n) for i, name in enumerate(self.branch_names)}
        self.q = SeparableProjection(dim, **dd)
        self.k = SeparableProjection(dim, **dd)
        self.v = SeparableProjection(dim, **dd)
        self.attn_probs = nn.ModuleDict({name: nn.Identity() for name in self.branch_names})
        self.proj = nn.Linear(dim, dim, **dd)

    def extra_repr(self) -> str:
        extra = f", direction={self.direction}" if self.direction else ""
        return f"dim={self.dim}, num_heads={self.num_heads}, mode={self.mode}, group_size={self.group_size}{extra}"

    def group(self, branch: str, q: Tensor, k: Tensor, v: Tensor) -> GroupedQKV:
        """``branch``'s groups of its ``(B, H, W, C_b)`` channels of ``q, k, v``."""
        raise NotImplementedError

    def ungroup(self, branch: str, out: Tensor, like: Tensor) -> Tensor:
        """``branch``'s attention output ``(N, heads, L, D)`` back on the map of ``like``: ``(B, H, W, C_b)``."""
        raise NotImplementedError

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The layout's attention on projected ``q, k, v`` of shape ``(B, H, W, C)``: every branch on
        its channels, concatenated."""
        outs = []
        for name, (channels, _) in self.branches.items():
            qb, kb, vb = (t[..., channels] for t in (q, k, v)) if len(self.branches) > 1 else (q, k, v)
            qg, kg, vg, mask = self.group(name, qb, kb, vb)
            if self.fused_attn:
                out = attend_in_groups(qg, kg, vg, mask)
            else:
                out = self.attn_probs[name](attention_weights(qg, kg, mask)) @ vg
            outs.append(self.ungroup(name, out, qb))
        return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]

    def forward(self, x: Tensor) -> Tensor:
        x = check_token_map(x, self.dim, type(self).__name__)
        return self.proj(self.attend(self.q(x), self.k(x), self.v(x)))


class PSAttention(GroupedAttention):
    """Pale-shaped self-attention, parallel form (Eq. 1-3): the first half of the channels and heads
    attend inside groups of ``s_r`` rows, the other half inside groups of ``s_c`` columns, between
    separable q/k/v projections and a linear output projection.

    With the layout of ``axial`` (pale size 1) or ``cross_shaped`` (contiguous stripes) it computes
    those modes: the same operator with other groups.
    """

    branch_names = ("row", "column")

    def __init__(self, dim: int, num_heads: int, layout: Optional[AttentionLayout] = None,
                 device: DeviceLike = None, dtype: Optional[torch.dtype] = None):
        super().__init__(dim, num_heads, layout or attention_layout("parallel"), device=device, dtype=dtype)
        if num_heads % 2:
            raise ValueError(f"mode {self.mode!r} splits heads between a row and a column branch: "
                             f"num_heads={num_heads} must be even")

    def group(self, branch: str, q: Tensor, k: Tensor, v: Tensor) -> GroupedQKV:
        size = self.group_size[DIRECTIONS.index(branch)]
        return group_lines(q, k, v, self.num_heads // 2, size, self.interlaced, branch)

    def ungroup(self, branch: str, out: Tensor, like: Tensor) -> Tensor:
        return ungroup_lines(out, like, self.group_size[DIRECTIONS.index(branch)], self.interlaced, branch)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s_r, s_c = self.group_size
        # A square map that needs no padding: both branches in one kernel call (tested equal). Not in
        # graphs that must serve every size (FX, torch.jit.trace, torch.export), nor on the explicit path.
        if (self.fused_attn and not isinstance(q, torch.fx.Proxy) and not traced_for_any_size() and s_r == s_c
                and q.shape[1] == q.shape[2] and q.shape[1] % s_r == 0):
            return ps_attention_one_call(q, k, v, self.num_heads // 2, s_r, self.interlaced)
        return super().attend(q, k, v)


def create_attention(dim: int, num_heads: int, pale_size: PairOrInt = 7, mode: AttnMode = "parallel",
                     direction: Optional[str] = None, stripe_width: PairOrInt = 7, device: DeviceLike = None,
                     dtype: Optional[torch.dtype] = None) -> GroupedAttention:
    """The attention layer of ``mode`` (:data:`ATTN_MODES`) with its :func:`attention_layout`."""
    layout = attention_layout(mode, pale_size, stripe_width, direction)
    return attention_mode(mode).layer(dim, num_heads, layout, device=device, dtype=dtype)


register_attention_mode(AttentionMode("parallel", PSAttention, pale_group_size, two_branch_macs))
register_attention_mode(AttentionMode("axial", PSAttention, lambda pale_size, stripe_width: (1, 1), two_branch_macs))
register_attention_mode(AttentionMode("cross_shaped", PSAttention,
                                      lambda pale_size, stripe_width: as_pair(stripe_width, "stripe_width"),
                                      two_branch_macs, interlaced=False))

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


class CeilMaxPool2d(nn.Module):
    """2x2 max-pooling with stride 2 that keeps a last odd row or column, as ``nn.MaxPool2d(2,
    ceil_mode=True)``: ``(B, C, H, W)`` -> ``(B, C, ceil(H/2), ceil(W/2))``.

    Written as a pad of one row and column of -inf, then pooling in floor mode: the same values, and
    an output size torch.export proves for every input size (ceil mode's size rule asks whether
    ``2 ((H - 1) // 2) < H``, which it cannot prove)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 2)


class DeepConvStem(nn.Module):
    """Four 3x3 conv-BatchNorm-ReLU layers of ``C/2, C/2`` channels, a 2x2 max-pool, ``C, C`` channels, then
    a 1x1 convolution and LayerNorm: ``(B, H, W, C_in)`` -> ``(B, ceil(H/2), ceil(W/2), C)``.

    Not the paper's stem (a 7x7 stride-4 convolution, Sec. 3.3): a stack of 3x3 convolutions in front of the
    transformer, as Xiao et al. (2021, "Early convolutions help transformers see better") propose, with
    output stride 2, for small images. On 3500 MNIST digits at 28x28 it validated better than the paper's
    stem on 56x56 upsampled digits (the demo of docs/training.md)."""

    def __init__(self, in_chans: int, dim: int, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 device: DeviceLike = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        half = max(dim // 2, 1)
        self.convs = nn.Sequential(ConvNormAct(in_chans, half, 3, **dd), ConvNormAct(half, half, 3, **dd),
                                   CeilMaxPool2d(), ConvNormAct(half, dim, 3, **dd),
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
        attention_mode(attn_mode)  # an unknown mode: a clear error before anything is built
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
