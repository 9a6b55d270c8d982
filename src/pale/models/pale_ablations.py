"""The sequential and vanilla forms of PS-attention the paper's ablation compares (Table 8).

Both are registered attention modes (:func:`~pale.models.pale_transformer.register_attention_mode`,
``attn_mode='sequential'`` / ``'vanilla'``):

* :class:`SequentialPSAttention`: one direction on all channels and heads; the network alternates
  row and column attention from block to block (:func:`~pale.models.pale_transformer.block_direction`).
* :class:`VanillaPSAttention`: all channels and heads attend inside each whole pale
  (:func:`per_pale_attention`).
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import is_exporting
from torch import Tensor

from .pale_transformer import (DIRECTIONS, AttentionLayout, AttentionMode, GroupedAttention, GroupedQKV,
                               attend_in_groups, group_lines, merge_heads, pale_count,
                               eager_cache, pale_group_size, register_attention_mode, row_groups_macs,
                               split_heads, ungroup_lines)

__all__ = ["SequentialPSAttention", "VanillaPSAttention", "per_pale_attention", "group_pales", "ungroup_pales",
           "pale_index"]

# torch.fx.wrap patches a name in the module that calls it: the imported leaves are leaves here too.
for _leaf in ("attend_in_groups", "group_lines", "ungroup_lines"):
    torch.fx.wrap(_leaf)


# --------------------------------------------------------------------------------------------
# Sequential: rows or columns on all channels
# --------------------------------------------------------------------------------------------

class SequentialPSAttention(GroupedAttention):
    """Row-group attention (``direction='row'``, groups of ``s_r`` interlaced rows) or column-group
    attention (``'column'``, ``s_c`` columns) on all channels and heads."""

    def group(self, branch: str, q: Tensor, k: Tensor, v: Tensor) -> GroupedQKV:
        size = self.group_size[DIRECTIONS.index(self.direction)]
        return group_lines(q, k, v, self.num_heads, size, self.interlaced, self.direction)

    def ungroup(self, branch: str, out: Tensor, like: Tensor) -> Tensor:
        return ungroup_lines(out, like, self.group_size[DIRECTIONS.index(self.direction)], self.interlaced,
                             self.direction)


def sequential_macs(layout: AttentionLayout, h: int, w: int, c: int, padded: bool) -> int:
    """Attention matmuls of one direction on all ``c`` channels (Eq. 14's row or column term)."""
    s_r, s_c = layout.group_size
    if layout.direction == "column":
        return row_groups_macs(w, h, c, s_c, padded)
    return row_groups_macs(h, w, c, s_r, padded)


# --------------------------------------------------------------------------------------------
# Vanilla: attention inside each whole pale
# --------------------------------------------------------------------------------------------

def pale_index(num_pales: int, pale_size: Tuple[int, int], device: Optional[torch.device] = None
               ) -> Tuple[Tensor, Tensor]:
    """Which tokens of the padded ``(N s_r, N s_c)`` map each pale holds, and how many pales hold each
    token, built on ``device``.

    Pale ``i`` is interlaced row group ``i`` (rows ``i, i + N, ..., i + (s_r - 1) N``, all columns)
    joined with interlaced column group ``i`` (columns ``i, i + N, ...``, all rows), each token once.

    Returns:
        ``index``: ``(N, P)`` row-major token indices, ``P = s_r Wp + s_c Hp - s_r s_c`` (the row
        group's tokens, then the column group's tokens outside it, rows in increasing order);
        ``count``: ``(Hp Wp,)``, 1 or 2.
    """
    n, (s_r, s_c) = num_pales, pale_size
    hp, wp = n * s_r, n * s_c
    arange = functools.partial(torch.arange, device=device)
    pale = arange(n).view(n, 1, 1)
    rows = pale + n * arange(s_r).view(1, s_r, 1)                               # (N, s_r, 1)
    in_row_group = rows * wp + arange(wp).view(1, 1, wp)                         # (N, s_r, Wp)
    # The t-th row outside the row group: block t // (N - 1) of N rows, skipping the pale's own row.
    t = arange(hp - s_r).view(1, hp - s_r, 1)
    r = t % max(n - 1, 1)
    other_rows = t // max(n - 1, 1) * n + r + (r >= pale).long()                 # (N, Hp - s_r, 1)
    in_col_group = other_rows * wp + pale + n * arange(s_c).view(1, 1, s_c)      # (N, Hp - s_r, s_c)
    index = torch.cat((in_row_group.reshape(n, -1), in_col_group.reshape(n, -1)), dim=1)
    count = 1 + (arange(hp).view(hp, 1) % n != arange(wp).view(1, wp) % n).long().view(-1)
    return index, count


_cached_pale_index = eager_cache(pale_index)


def _pale_index_for(q: Tensor, num_pales: int, pale_size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    return _cached_pale_index(num_pales, tuple(pale_size), q.device)


@eager_cache
def pale_key_mask(batch: int, height: int, width: int, num_pales: int, pale_size: Tuple[int, int],
                  device: torch.device) -> Tensor:
    """Which tokens of each pale are real (not padding) on an ``height x width`` map padded to
    ``(N s_r, N s_c)``: ``(B N, 1, 1, P)`` bool, as attention takes it."""
    hp, wp = num_pales * pale_size[0], num_pales * pale_size[1]
    index, _ = _cached_pale_index(num_pales, tuple(pale_size), device)
    real = ((torch.arange(hp, device=device) < height).view(hp, 1)
            & (torch.arange(wp, device=device) < width).view(1, wp)).view(-1)
    tokens = index.shape[1]
    return real[index].view(1, num_pales, 1, 1, tokens).expand(batch, num_pales, 1, 1, tokens).reshape(
        batch * num_pales, 1, 1, tokens)


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
def group_pales(q: Tensor, k: Tensor, v: Tensor, num_heads: int, pale_size: Tuple[int, int]) -> GroupedQKV:
    """``q, k, v`` in the ``N`` pales of vanilla PS-attention, all channels.

    The map is padded to ``(N s_r, N s_c)`` (:func:`~pale.models.pale_transformer.pale_count`) and
    split into ``N`` pales of ``P = s_r Wp + s_c Hp - s_r s_c`` tokens (:func:`pale_index`).

    Args:
        q, k, v: ``(B, H, W, C)``; ``C`` divisible by ``num_heads``.
    Returns:
        :data:`~pale.models.pale_transformer.GroupedQKV`: ``(B N, heads, P, C / heads)`` and the
        mask of real keys (None when the map needs no padding).
    """
    if torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():  # ONNX has no exceptions; its export is static
        q = _traced_size_check()(q, int(q.shape[1]), int(q.shape[2]))
    b, h, w, c = q.shape
    if is_exporting() and not (isinstance(h, int) and isinstance(w, int)):
        raise RuntimeError("attn_mode='vanilla' cannot be exported with a dynamic height or width: its pale count "
                           "max(ceil(h / s_r), ceil(w / s_c)) is a Python choice on the map size; export at a static size")
    n = pale_count(h, w, pale_size)
    hp, wp = n * pale_size[0], n * pale_size[1]
    index, _ = _pale_index_for(q, n, pale_size)
    padded = (hp, wp) != (h, w)
    if padded:
        q, k, v = (F.pad(t, (0, 0, 0, wp - w, 0, hp - h)) for t in (q, k, v))
    tokens = index.shape[1]
    qp, kp, vp = (split_heads(t.reshape(b, hp * wp, c).index_select(1, index.view(-1)).view(b * n, tokens, c),
                              num_heads) for t in (q, k, v))
    mask = pale_key_mask(b, h, w, n, tuple(pale_size), q.device) if padded else None
    return qp, kp, vp, mask


@torch.fx.wrap
def ungroup_pales(out: Tensor, like: Tensor, pale_size: Tuple[int, int]) -> Tensor:
    """Inverse of :func:`group_pales` on the attention output: ``(B N, heads, P, D)`` -> the
    ``(B, H, W, heads D)`` map of ``like``. Pales overlap: token ``(y, x)`` lies in pale ``y mod N``
    and pale ``x mod N``, so it gets one output from each pale it is in, and its result is their
    mean. The paper does not say how they combine; the mean keeps every token's output on the same
    scale whether it lies in one pale or two."""
    b, h, w = like.shape[:3]
    n = pale_count(h, w, pale_size)
    hp, wp = n * pale_size[0], n * pale_size[1]
    index, count = _pale_index_for(out, n, pale_size)
    out = merge_heads(out)                                                        # (B N, P, C)
    c = out.shape[-1]
    out = out.new_zeros(b, hp * wp, c).index_add(1, index.view(-1), out.view(b, n * index.shape[1], c))
    out = out / count.view(1, -1, 1).to(out.dtype)
    return out.view(b, hp, wp, c)[:, :h, :w]


def per_pale_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, pale_size: Tuple[int, int]) -> Tensor:
    """The paper's vanilla PS-attention as one function (fused path): multi-head self-attention inside
    each whole pale (:func:`group_pales`, :func:`ungroup_pales`). Padded keys are masked and padded
    queries dropped.

    Cost: one attention call over ``B N`` sequences of ``P`` tokens, ``2 c N P^2`` multiply-adds.
    The pale count is a Python choice on the map size: a ``torch.jit.trace`` holds the one of its
    example size, and raises a clear error at another size.

    Args:
        q, k, v: ``(B, H, W, C)``; ``C`` divisible by ``num_heads``.
    Returns:
        ``(B, H, W, C)``.
    """
    qp, kp, vp, mask = group_pales(q, k, v, num_heads, pale_size)
    return ungroup_pales(attend_in_groups(qp, kp, vp, mask), q, pale_size)


class VanillaPSAttention(GroupedAttention):
    """All channels and heads attend inside each whole pale: :func:`per_pale_attention`."""

    def group(self, branch: str, q: Tensor, k: Tensor, v: Tensor) -> GroupedQKV:
        return group_pales(q, k, v, self.num_heads, self.group_size)

    def ungroup(self, branch: str, out: Tensor, like: Tensor) -> Tensor:
        return ungroup_pales(out, like, self.group_size)


def vanilla_macs(layout: AttentionLayout, h: int, w: int, c: int, padded: bool) -> int:
    """``2 c N P^2``: ``N`` pales of ``P = s_r Wp + s_c Hp - s_r s_c`` tokens, all ``c`` channels. The
    paper defines the pales on the map padded to ``h / s_r = w / s_c``, so its formula counts the
    padding too (Table 8's 5.4G)."""
    s_r, s_c = layout.group_size
    n = pale_count(h, w, layout.group_size)
    tokens = s_r * n * s_c + s_c * n * s_r - s_r * s_c
    return 2 * c * n * tokens * tokens


register_attention_mode(AttentionMode("sequential", SequentialPSAttention, pale_group_size, sequential_macs,
                                      directed=True))
register_attention_mode(AttentionMode("vanilla", VanillaPSAttention, pale_group_size, vanilla_macs,
                                      any_size_graph=False))
