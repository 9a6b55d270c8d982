"""The sequential and vanilla forms of PS-attention the paper's ablation compares (Table 8).

They plug into :class:`pale.models.pale_transformer.PaleBlock` through
:func:`~pale.models.pale_transformer.register_attention` (``attn_mode='sequential'`` / ``'vanilla'``):

* :class:`SequentialPSAttention`: one direction on all channels and heads; the network alternates
  row and column attention from block to block (:func:`~pale.models.pale_transformer.block_direction`).
* :class:`VanillaPSAttention`: all channels and heads attend inside each whole pale
  (:func:`per_pale_attention`).
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .pale_transformer import (GroupedAttention, KeptWeights, attend_in_groups, column_group_attention,
                               merge_heads, pale_count, register_attention, row_group_attention, split_heads,
                               traced_for_any_size)

__all__ = ["SequentialPSAttention", "sequential_attention", "VanillaPSAttention", "per_pale_attention", "pale_index"]


@torch.fx.wrap
def sequential_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, group_size: Tuple[int, int],
                         interlaced: bool, direction: str, fused: bool = True, keep: KeptWeights = None) -> Tensor:
    """Attention inside groups of ``s_r`` rows (``direction='row'``) or ``s_c`` columns, all channels
    and heads. ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
    if direction == "row":
        return row_group_attention(q, k, v, num_heads, group_size[0], interlaced, fused, keep)
    return column_group_attention(q, k, v, num_heads, group_size[1], interlaced, fused, keep)


@register_attention("sequential")
class SequentialPSAttention(GroupedAttention):
    """Row-group attention (``direction='row'``, groups of ``s_r`` interlaced rows) or column-group
    attention (``'column'``, ``s_c`` columns) on all channels and heads."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, keep: KeptWeights) -> Tensor:
        return sequential_attention(q, k, v, self.num_heads, self.group_size, self.interlaced, self.direction,
                                    self.fused_attn, keep)


@functools.lru_cache(maxsize=64)
def pale_index(num_pales: int, pale_size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
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


def _same_size_as_traced(x: Tensor, height: int, width: int) -> Tensor:
    """``x`` if its map is ``height x width``, else a clear error (scripted by :func:`_traced_size_check`)."""
    if x.size(1) != height or x.size(2) != width:
        raise RuntimeError("vanilla PS-attention was traced on a {}x{} map and cannot run on {}x{}: its pale "
                           "count is fixed in the trace; trace the model at this size".format(
                               height, width, x.size(1), x.size(2)))
    return x


@functools.lru_cache(maxsize=None)
def _traced_size_check() -> Callable[[Tensor, int, int], Tensor]:
    """:func:`_same_size_as_traced`, scripted: a ``torch.jit.trace`` records a scripted call with its
    control flow, so the traced graph raises the clear error at another size instead of a reshape error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; only it can do this
        return torch.jit.script(_same_size_as_traced)


@torch.fx.wrap
def per_pale_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, pale_size: Tuple[int, int],
                       fused: bool = True, keep: KeptWeights = None) -> Tensor:
    """The paper's vanilla PS-attention: multi-head self-attention inside each whole pale.

    The map is padded to ``(N s_r, N s_c)`` (:func:`~pale.models.pale_transformer.pale_count`) and
    split into ``N`` pales of ``P = s_r Wp + s_c Hp - s_r s_c`` tokens (:func:`pale_index`); all
    channels and heads attend inside each pale individually. Padded keys are masked and padded
    queries dropped. Pales overlap: token ``(y, x)`` lies in pale ``y mod N`` and pale ``x mod N``,
    so it gets one output from each pale it is in, and its result is their mean. The paper does not
    say how they combine; the mean keeps every token's output on the same scale whether it lies in
    one pale or two.

    Cost: one attention call over ``B N`` sequences of ``P`` tokens, ``2 c N P^2`` multiply-adds.
    The pale count is a Python choice on the map size: a ``torch.jit.trace`` holds the one of its
    example size, and raises a clear error at another size.

    Args:
        q, k, v: ``(B, H, W, C)``; ``C`` divisible by ``num_heads``.
        fused, keep: see :func:`~pale.models.pale_transformer.attend_in_groups`.
    Returns:
        ``(B, H, W, C)``.
    """
    if torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():  # ONNX has no exceptions; its export is static
        q = _traced_size_check()(q, int(q.shape[1]), int(q.shape[2]))
    b, h, w, c = q.shape
    n = pale_count(h, w, pale_size)
    hp, wp = n * pale_size[0], n * pale_size[1]
    # The cache only outside graph capture: tensors made while tracing or exporting must not outlive it.
    build = pale_index.__wrapped__ if traced_for_any_size() or torch.compiler.is_compiling() else pale_index
    index, count = (t.to(q.device) for t in build(n, tuple(pale_size)))
    padded = (hp, wp) != (h, w)
    if padded:
        q, k, v = (F.pad(t, (0, 0, 0, wp - w, 0, hp - h)) for t in (q, k, v))
    tokens = index.shape[1]
    qp, kp, vp = (split_heads(t.reshape(b, hp * wp, c).index_select(1, index.view(-1)).view(b * n, tokens, c),
                              num_heads) for t in (q, k, v))
    mask = None
    if padded:
        real = ((torch.arange(hp, device=q.device) < h).view(hp, 1)
                & (torch.arange(wp, device=q.device) < w).view(1, wp)).view(-1)
        mask = real[index].view(1, n, 1, 1, tokens).expand(b, n, 1, 1, tokens).reshape(b * n, 1, 1, tokens)
    token_ids = None
    if keep is not None:
        token_ids = F.pad(torch.arange(h * w, device=q.device).view(h, w), (0, wp - w, 0, hp - h), value=-1).view(-1)[index]
    out = merge_heads(attend_in_groups(qp, kp, vp, mask, fused, keep, token_ids))   # (B N, P, C)
    out = out.new_zeros(b, hp * wp, c).index_add(1, index.view(-1), out.view(b, n * tokens, c))
    out = out / count.view(1, -1, 1).to(out.dtype)
    return out.view(b, hp, wp, c)[:, :h, :w]


@register_attention("vanilla")
class VanillaPSAttention(GroupedAttention):
    """All channels and heads attend inside each whole pale: :func:`per_pale_attention`."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, keep: KeptWeights) -> Tensor:
        return per_pale_attention(q, k, v, self.num_heads, self.group_size, self.fused_attn, keep)
