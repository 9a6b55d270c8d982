"""Slow, obviously-correct references for the attention modes: dense attention over all tokens of
the map, restricted by an explicit boolean mask built from each mode's group definition."""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor


def interlaced_group_ids(length: int, group_size: int) -> Tensor:
    """Group of each row: with ``n = ceil(length / group_size)`` groups, row ``y`` is in group ``y mod n``."""
    n = math.ceil(length / group_size)
    return torch.arange(length) % n


def contiguous_group_ids(length: int, group_size: int) -> Tensor:
    """Group of each row for contiguous stripes: row ``y`` is in stripe ``y // group_size``."""
    return torch.arange(length) // group_size


def same_row_group(h: int, w: int, ids: Tensor) -> Tensor:
    """``(HW, HW)`` mask: query and key rows share a group (tokens in row-major order)."""
    rows = ids.view(h, 1).expand(h, w).reshape(-1)
    return rows[:, None] == rows[None, :]


def same_col_group(h: int, w: int, ids: Tensor) -> Tensor:
    cols = ids.view(1, w).expand(h, w).reshape(-1)
    return cols[:, None] == cols[None, :]


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, num_heads: int) -> Tensor:
    """Dense multi-head attention. q, k, v: ``(B, H, W, C)``; mask ``(HW, HW)``, True = may attend."""
    b, h, w, c = q.shape
    d = c // num_heads
    qf, kf, vf = (t.reshape(b, h * w, num_heads, d).transpose(1, 2) for t in (q, k, v))
    scores = qf @ kf.transpose(-2, -1) / math.sqrt(d)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(1, 2).reshape(b, h, w, c)


def mode_masks(mode: str, h: int, w: int, group_size: Tuple[int, int], direction: str = "row"):
    """The mask (or the row-branch and column-branch masks) a mode defines on an ``h x w`` map."""
    s_r, s_c = group_size
    if mode in ("parallel", "axial"):
        return (same_row_group(h, w, interlaced_group_ids(h, s_r)),
                same_col_group(h, w, interlaced_group_ids(w, s_c)))
    if mode == "cross_shaped":
        return (same_row_group(h, w, contiguous_group_ids(h, s_r)),
                same_col_group(h, w, contiguous_group_ids(w, s_c)))
    if mode == "sequential":
        if direction == "row":
            return same_row_group(h, w, interlaced_group_ids(h, s_r))
        return same_col_group(h, w, interlaced_group_ids(w, s_c))
    if mode == "vanilla":  # a token reaches every token of the pales that hold it
        members = pale_members(h, w, group_size).double()
        return members.t() @ members > 0
    raise ValueError(mode)


def pale_members(h: int, w: int, pale_size: Tuple[int, int]) -> Tensor:
    """``(N, HW)`` bool: which real tokens each pale of vanilla PS-attention holds. With the map
    padded to ``h / s_r = w / s_c = N``, pale ``i`` is the rows ``y`` with ``y mod N = i`` and the
    columns ``x`` with ``x mod N = i``."""
    s_r, s_c = pale_size
    n = max(math.ceil(h / s_r), math.ceil(w / s_c))
    rows = torch.arange(h).view(h, 1).expand(h, w).reshape(-1)
    cols = torch.arange(w).view(1, w).expand(h, w).reshape(-1)
    pales = torch.arange(n).view(n, 1)
    return (rows % n == pales) | (cols % n == pales)


def per_pale_reference(q: Tensor, k: Tensor, v: Tensor, num_heads: int, pale_size: Tuple[int, int]) -> Tensor:
    """Vanilla PS-attention from its definition: for each pale, dense attention among its tokens
    only; each token's result is the mean over the pales that hold it."""
    b, h, w, c = q.shape
    total = torch.zeros_like(q)
    count = torch.zeros(h * w, dtype=q.dtype)
    for member in pale_members(h, w, pale_size):
        mask = member[:, None] & member[None, :]
        mask = mask | ~member[:, None]          # queries outside the pale: any finite row, zeroed below
        out = masked_attention(q, k, v, mask, num_heads)
        total = total + out * member.view(1, h, w, 1).to(q.dtype)
        count += member.to(q.dtype)
    return total / count.view(1, h, w, 1)


def reference_attention(layer, x: Tensor) -> Tensor:
    """What ``layer`` (an attention layer of any mode) should compute on ``x``, by dense masked attention."""
    b, h, w, c = x.shape
    q, k, v = layer.q(x), layer.k(x), layer.v(x)
    if layer.mode == "vanilla":
        return layer.proj(per_pale_reference(q, k, v, layer.num_heads, layer.group_size))
    masks = mode_masks(layer.mode, h, w, layer.group_size, layer.direction or "row")
    if isinstance(masks, tuple):
        half, heads = c // 2, layer.num_heads // 2
        rows = masked_attention(q[..., :half], k[..., :half], v[..., :half], masks[0], heads)
        cols = masked_attention(q[..., half:], k[..., half:], v[..., half:], masks[1], heads)
        out = torch.cat((rows, cols), dim=-1)
    else:
        out = masked_attention(q, k, v, masks, layer.num_heads)
    return layer.proj(out)
