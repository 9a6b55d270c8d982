"""An independent reference for the Pale Transformer, written from the paper alone.

Wu et al., "Pale Transformer", AAAI 2022: Eq. 1-3 (PS-attention), Eq. 6-8 (the block), Table 1 and
"Overall Architecture" (stem, patch merging, head). It shares no code with ``pale``: the model is
used only as a bag of weights, read by ``state_dict`` key name into plain tensors, and every layer
is written out here in float64: per-token key sets built from each attention mode's definition, and
``softmax(q k^T * scale) v`` over each set.

Definitions (``h x w`` map, real tokens numbered row-major ``t = y * w + x``):

* interlaced row groups of size ``s_r`` (Eq. 1): pad ``h`` up to ``hp``, a multiple of ``s_r``; with
  ``N_r = hp / s_r`` groups, group ``g`` holds rows ``g, g + N_r, ..., g + (s_r - 1) N_r``; columns
  likewise with ``s_c``. Padded rows hold no token: they are never keys, and never queries.
* ``parallel`` (Eq. 1-3): the first ``C/2`` channels and ``num_heads/2`` heads attend within row groups,
  the last ``C/2`` channels and heads within column groups; outputs concatenated in that order.
* ``axial``: ``parallel`` with pale size 1 (one row, one column).
* ``cross_shaped`` (CSWin): ``parallel`` with contiguous stripes of ``stripe_width`` rows / columns.
* ``sequential``: all channels and heads; even blocks of a stage (0, 2, ...) use row groups, odd
  blocks column groups.
* ``vanilla`` (attention "within the whole pale"): ``N = max(ceil(h / s_r), ceil(w / s_c))`` pales;
  pale ``i`` is interlaced row group ``i`` (of ``hp = N s_r`` rows) united with interlaced column group
  ``i`` (of ``wp = N s_c`` columns); attention over all channels and heads within each pale; a token
  lies in one or two pales and its output is the mean of its pales' outputs.

Every head has ``head_dim = C / num_heads`` channels and scale ``head_dim ** -0.5``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-5  # LayerNorm and BatchNorm epsilon (PyTorch's default; the paper does not give one)
BN_EPS = 1e-5
Groups = List[List[int]]


# ---- token groups, from each mode's definition ---------------------------------------------------

def interlaced_rows(h: int, group_size: int) -> List[List[int]]:
    """Row indices of each interlaced group: pad to a multiple of ``group_size``, drop padded rows."""
    n = math.ceil(h / group_size)
    return [[g + j * n for j in range(group_size) if g + j * n < h] for g in range(n)]


def contiguous_rows(h: int, group_size: int) -> List[List[int]]:
    """Row indices of each contiguous stripe of ``group_size`` rows (the last one may be shorter)."""
    return [list(range(start, min(start + group_size, h))) for start in range(0, h, group_size)]


def tokens_in_rows(rows: Sequence[int], h: int, w: int) -> List[int]:
    return [y * w + x for y in rows for x in range(w)]


def tokens_in_cols(cols: Sequence[int], h: int, w: int) -> List[int]:
    return [y * w + x for y in range(h) for x in cols]


def row_groups(h: int, w: int, group_size: int, interlaced: bool = True) -> Groups:
    rows = interlaced_rows(h, group_size) if interlaced else contiguous_rows(h, group_size)
    return [tokens_in_rows(r, h, w) for r in rows]


def col_groups(h: int, w: int, group_size: int, interlaced: bool = True) -> Groups:
    cols = interlaced_rows(w, group_size) if interlaced else contiguous_rows(w, group_size)
    return [tokens_in_cols(c, h, w) for c in cols]


def pales(h: int, w: int, pale_size: Tuple[int, int]) -> Groups:
    """The vanilla mode's pales: interlaced row group ``i`` united with interlaced column group ``i``."""
    s_r, s_c = pale_size
    n = max(math.ceil(h / s_r), math.ceil(w / s_c))
    out = []
    for i in range(n):
        rows = [i + j * n for j in range(s_r) if i + j * n < h]
        cols = [i + j * n for j in range(s_c) if i + j * n < w]
        out.append(sorted(set(tokens_in_rows(rows, h, w)) | set(tokens_in_cols(cols, h, w))))
    return out


# ---- plain layers --------------------------------------------------------------------------------

def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    out = x @ weight.t()
    return out + bias if bias is not None else out


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LayerNorm over the last (channel) dimension."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS) * weight + bias


def gelu(x: Tensor) -> Tensor:
    """The exact GELU, ``x * Phi(x)``."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def conv_nhwc(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int, groups: int = 1) -> Tensor:
    """Zero-padded 2-D convolution of an NHWC map, ``weight`` in PyTorch's ``(out, in/groups, k, k)``."""
    return F.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride=stride, padding=padding,
                    groups=groups).permute(0, 2, 3, 1)


def depthwise3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Depthwise 3x3 convolution with zero padding 1, written as a sum of nine shifted maps."""
    b, h, w, c = x.shape
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))
    out = torch.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            out = out + padded[:, dy:dy + h, dx:dx + w, :] * weight[:, 0, dy, dx]
    return out + bias if bias is not None else out


def batch_norm(x: Tensor, p: Mapping[str, Tensor], training: bool) -> Tensor:
    """BatchNorm of an NHWC map: batch statistics (biased variance) in training, running ones in eval."""
    if training:
        mean = x.mean((0, 1, 2))
        var = x.var((0, 1, 2), unbiased=False)
    else:
        mean, var = p["running_mean"], p["running_var"]
    return (x - mean) / torch.sqrt(var + BN_EPS) * p["weight"] + p["bias"]


def sub(params: Mapping[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    """The entries under ``prefix.`` with the prefix removed."""
    prefix = prefix + "." if prefix else ""
    out = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no weights under {prefix!r}")
    return out


# ---- attention -----------------------------------------------------------------------------------

def multi_head_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """``softmax(q k^T / sqrt(head_dim)) v`` per head. q, k, v: ``(B, L, num_heads * head_dim)``."""
    b, length, _ = q.shape
    qh, kh, vh = (t.reshape(b, length, num_heads, head_dim).transpose(1, 2) for t in (q, k, v))
    scores = (qh @ kh.transpose(-2, -1)) * head_dim ** -0.5
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return (weights @ vh).transpose(1, 2).reshape(b, length, num_heads * head_dim)


def attention_in_groups(q: Tensor, k: Tensor, v: Tensor, groups: Groups, num_heads: int, head_dim: int) -> Tensor:
    """Each token attends to the tokens of the group(s) containing it; with several groups its output
    is their mean. q, k, v: ``(B, L, num_heads * head_dim)`` over the real tokens."""
    length = q.shape[1]
    membership = [0] * length
    for group in groups:
        for t in group:
            membership[t] += 1
    if min(membership) < 1:
        raise AssertionError("a token belongs to no group")
    out = torch.zeros_like(q)
    for group in groups:
        idx = torch.tensor(group, dtype=torch.long)
        share = torch.tensor([1.0 / membership[t] for t in group], dtype=q.dtype).view(1, -1, 1)
        out[:, idx] += share * multi_head_attention(q[:, idx], k[:, idx], v[:, idx], num_heads, head_dim)
    return out


@dataclass
class AttnConfig:
    """One PS-attention layer: the mode and sizes the network was asked to build."""

    num_heads: int
    mode: str = "parallel"
    pale_size: Tuple[int, int] = (7, 7)
    stripe_width: int = 7
    block_index: int = 0   # position of the block within its stage (sequential alternation)


def separable_projection(x: Tensor, p: Mapping[str, Tensor], training: bool) -> Tensor:
    """CvT's separable projection: depthwise 3x3 conv (no bias) -> BatchNorm -> linear."""
    y = depthwise3x3(x, p["dw.weight"], None)
    y = batch_norm(y, sub(p, "bn"), training)
    return linear(y, p["pw.weight"], p["pw.bias"])


def ps_attention(x: Tensor, p: Mapping[str, Tensor], cfg: AttnConfig, training: bool) -> Tensor:
    """PS-attention (Eq. 1-3 and the other modes) of an NHWC map ``x``; ``p`` holds the layer's
    ``q.*``, ``k.*``, ``v.*`` and ``proj.*`` weights."""
    b, h, w, c = x.shape
    head_dim = c // cfg.num_heads
    q, k, v = (separable_projection(x, sub(p, name), training).reshape(b, h * w, c) for name in "qkv")
    s_r, s_c = cfg.pale_size
    if cfg.mode == "vanilla":
        out = attention_in_groups(q, k, v, pales(h, w, (s_r, s_c)), cfg.num_heads, head_dim)
    elif cfg.mode == "sequential":
        groups = row_groups(h, w, s_r) if cfg.block_index % 2 == 0 else col_groups(h, w, s_c)
        out = attention_in_groups(q, k, v, groups, cfg.num_heads, head_dim)
    else:
        if cfg.mode == "parallel":
            rows, cols = row_groups(h, w, s_r), col_groups(h, w, s_c)
        elif cfg.mode == "axial":
            rows, cols = row_groups(h, w, 1), col_groups(h, w, 1)
        elif cfg.mode == "cross_shaped":
            rows = row_groups(h, w, cfg.stripe_width, interlaced=False)
            cols = col_groups(h, w, cfg.stripe_width, interlaced=False)
        else:
            raise ValueError(f"unknown mode {cfg.mode!r}")
        half, heads = c // 2, cfg.num_heads // 2
        out = torch.cat((
            attention_in_groups(q[..., :half], k[..., :half], v[..., :half], rows, heads, head_dim),
            attention_in_groups(q[..., half:], k[..., half:], v[..., half:], cols, heads, head_dim)), -1)
    return linear(out.reshape(b, h, w, c), p["proj.weight"], p["proj.bias"])


def pale_block(x: Tensor, p: Mapping[str, Tensor], cfg: AttnConfig, training: bool, cpe: bool = True) -> Tensor:
    """Eq. 6-8: ``x + CPE(x)``, then ``+ PS-Attention(LN(.))``, then ``+ MLP(LN(.))`` (GELU)."""
    if cpe:
        x = x + depthwise3x3(x, p["cpe.proj.weight"], p["cpe.proj.bias"])
    x = x + ps_attention(layer_norm(x, p["norm1.weight"], p["norm1.bias"]), sub(p, "attn"), cfg, training)
    hidden = gelu(linear(layer_norm(x, p["norm2.weight"], p["norm2.bias"]), p["mlp.fc1.weight"], p["mlp.fc1.bias"]))
    return x + linear(hidden, p["mlp.fc2.weight"], p["mlp.fc2.bias"])


# ---- the network ---------------------------------------------------------------------------------

@dataclass
class NetConfig:
    """What the tiny network was built with (not read from the model)."""

    depths: Sequence[int]
    num_heads: Sequence[int]
    mode: str = "parallel"
    pale_size: Tuple[int, int] = (7, 7)
    stripe_width: int = 7
    pos_embed: str = "cpe"
    img_size: Tuple[int, int] = (224, 224)


def merging_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def stage_grid(img_size: Tuple[int, int], stage: int) -> Tuple[int, int]:
    """Map size at ``stage`` for an ``img_size`` input: stem 7x7/4 pad 2, then 3x3/2 pad 1 per stage."""
    h, w = (merging_out(s, 7, 4, 2) for s in img_size)
    for _ in range(stage):
        h, w = merging_out(h, 3, 2, 1), merging_out(w, 3, 2, 1)
    return h, w


def stage_pos_embed(params: Mapping[str, Tensor], stage: int, dim: int) -> Tensor:
    """The stage's learned absolute position table as ``(1, C, H, W)``, found by key name:
    the one key under ``stages.{stage}.`` whose last name part is ``pos_embed`` (or ``pos_embed.weight``)."""
    keys = [k for k in params if k.startswith(f"stages.{stage}.")
            and (k.split(".")[-1] == "pos_embed" or k.endswith("pos_embed.weight"))]
    if len(keys) != 1:
        raise KeyError(f"expected one position table under stages.{stage}., found {keys}")
    table = params[keys[0]]
    table = table.reshape(1, *table.shape[-3:])
    return table if table.shape[1] == dim else table.permute(0, 3, 1, 2)   # NHWC table -> NCHW


def add_pos_embed(x: Tensor, table: Tensor) -> Tensor:
    """Add a ``(1, C, Ht, Wt)`` table to an NHWC map, resampled bicubically if the sizes differ."""
    h, w = x.shape[1:3]
    if tuple(table.shape[-2:]) != (h, w):
        table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return x + table.permute(0, 2, 3, 1)


def pale_transformer(images: Tensor, params: Mapping[str, Tensor], cfg: NetConfig,
                     training: bool) -> Tuple[Tensor, List[Tensor]]:
    """Logits and the four stage outputs (NHWC, before the final norm) of NCHW ``images``."""
    x = images.permute(0, 2, 3, 1)
    features = []
    for i, depth in enumerate(cfg.depths):
        # Patch merging (Table 1): 7x7 conv stride 4 (stem), then 3x3 conv stride 2; each + LN.
        merge = sub(params, "stem") if i == 0 else sub(params, f"stages.{i}.downsample")
        kernel, stride, padding = (7, 4, 2) if i == 0 else (3, 2, 1)
        x = conv_nhwc(x, merge["proj.weight"], merge["proj.bias"], stride, padding)
        x = layer_norm(x, merge["norm.weight"], merge["norm.bias"])
        if cfg.pos_embed == "ape":
            x = add_pos_embed(x, stage_pos_embed(params, i, x.shape[-1]))
        for j in range(depth):
            attn = AttnConfig(cfg.num_heads[i], cfg.mode, cfg.pale_size, cfg.stripe_width, block_index=j)
            x = pale_block(x, sub(params, f"stages.{i}.blocks.{j}"), attn, training, cpe=cfg.pos_embed == "cpe")
        features.append(x)
    pooled = layer_norm(x, params["norm.weight"], params["norm.bias"]).mean((1, 2))
    return linear(pooled, params["head.fc.weight"], params["head.fc.bias"]), features


def as_float64(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """A model's weights as plain float64 tensors, detached (integer buffers dropped)."""
    return {k: v.detach().to(torch.float64).clone() for k, v in state_dict.items() if v.is_floating_point()}
