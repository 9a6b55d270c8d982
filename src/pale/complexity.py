"""Parameters and multiply-adds of Pale models: analytic (from the paper's equations) and measured.

Two independent counts of the same thing:

* **Analytic** (:func:`analytic_cost`): closed-form multiply-adds per layer, from the paper's Eq. 4
  (global attention), Eq. 5 / 13-16 (parallel PS-attention), generalised to every attention mode,
  to padding and to non-square inputs, plus the rest of the network (stem and patch-merging convs,
  CPE, MLP, head). Each attention layer has two numbers: ``macs``, what our code computes (padded
  group sizes), and ``paper_macs``, the paper's formula on the real ``h x w`` map with no padding.
  Each registered attention mode gives its own matmul count (``AttentionMode.matmul_macs``). For
  ``vanilla`` both are ``2cNP^2`` (``N`` pales of ``P = s_r Wp + s_c Hp - s_r s_c`` tokens, all
  ``c`` channels, see ``per_pale_attention``): the paper defines vanilla on the map padded to
  ``h / s_r = w / s_c``, so the padding is part of its cost (Table 8's 5.4G, 2677G, 668G).
* **Measured** (:func:`measure_cost`): ``torch.utils.flop_counter.FlopCounterMode`` while the model
  runs a forward pass (it reports 2 FLOPs per multiply-add). Scaled-dot-product attention is forced
  onto its math backend: the fused CPU kernels are invisible to the counter. A model built on the
  ``meta`` device (``device='meta'``) runs the same code on shapes only: the same counts, no memory,
  no arithmetic.

Counted: convolutions, linear layers and both attention matmuls (q·k and attention·v, one
multiply-add per product). Not counted, in either count (as in the paper): biases, norms,
activations, softmax, the attention scale, additions, pooling and the resizing of a learned
position embedding.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .errors import InputError
from .models.pale_transformer import (MODEL_ARGS, AttentionLayout, PaleTransformer, as_pair, attention_layout,
                                      attention_mode, block_direction, stage_grids)

__all__ = [
    "ModelCost", "measure_cost", "measured_cost",
    "LayerMacs", "AnalyticCost", "PaleConfig", "analytic_cost",
    "global_attention_macs", "pale_attention_macs", "attention_matmul_macs",
    "global_model_macs", "stage_sizes", "PAPER_TABLES", "PaperRow", "ComparisonRow", "compare_paper",
]

Pair = Tuple[int, int]


# ============================================================================================
# Measured
# ============================================================================================

@dataclass
class ModelCost:
    """Parameters and multiply-adds of a model at one input size: in total, per top-level part
    (``stem``, ``pos_embed``, ``stages.0`` ... ``norm``, ``head``) and per module path."""

    img_size: Pair
    params: int
    macs: int
    params_by_part: Dict[str, int] = field(default_factory=dict)
    macs_by_part: Dict[str, int] = field(default_factory=dict)
    macs_by_module: Dict[str, int] = field(default_factory=dict)


def _part_of(name: str, parts: Sequence[str]) -> str:
    for part in parts:
        if name == part or name.startswith(part + "."):
            return part
    return name.split(".")[0]  # a top-level parameter such as pos_embed


def model_parts(model: nn.Module) -> Tuple[str, ...]:
    """Top-level parts to report: ``stem``, ``stages.0`` ... ``stages.N``, then other children."""
    parts = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and name == "stages":
            parts.extend(f"stages.{i}" for i in range(len(child)))
        else:
            parts.append(name)
    return tuple(parts)


def _param_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _nonzero_on_meta(device: torch.device) -> contextlib.AbstractContextManager:
    """On ``meta``, let ``torch.nonzero`` assume every element is nonzero. torchvision's multi-level
    RoIAlign uses it to pick each FPN level's RoIs; the box and mask heads still run once on all
    RoIs and RoIAlign is not counted, so the counts equal a CPU run's (Mask R-CNN + Pale-T at
    800x1280: 299.1G either way)."""
    if device.type != "meta":
        return contextlib.nullcontext()
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(meta_nonzero_assume_all_nonzero=True)


@torch.no_grad()
def measure_cost(model: nn.Module, img_size: Pair, in_chans: int = 3,
                 make_input: Optional[Callable[[Pair, torch.device], Any]] = None) -> ModelCost:
    """Count parameters and the multiply-adds of one forward pass, in eval mode.

    Args:
        model: runs on the device of its parameters; on ``meta`` only shapes are computed.
        img_size: ``(H, W)``.
        in_chans: channels of the default input, a ``(1, in_chans, H, W)`` zero tensor.
        make_input: ``(img_size, device) -> input`` for models that take something else
            (a detector's list of images, say).
    """
    parts = model_parts(model)
    params_by_part: Dict[str, int] = {}
    for name, p in model.named_parameters():
        key = _part_of(name, parts)
        params_by_part[key] = params_by_part.get(key, 0) + p.numel()
    device = _param_device(model)
    x = make_input(tuple(img_size), device) if make_input else torch.zeros(1, in_chans, *img_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, _nonzero_on_meta(device):
            model(x)
    finally:
        model.train(was_training)
    root = type(model).__name__ + "."
    macs_by_module = {name[len(root):]: sum(counts.values()) // 2
                      for name, counts in counter.get_flop_counts().items() if name.startswith(root)}
    macs_by_part = {part: macs_by_module.get(part, 0) for part in parts}
    total = counter.get_total_flops() // 2
    return ModelCost(tuple(img_size), sum(params_by_part.values()), total, params_by_part, macs_by_part,
                     macs_by_module)


def measured_cost(model_name: str, input_size: Pair, shapes_only: bool = True, **kwargs: Any) -> ModelCost:
    """Build ``timm.create_model(model_name, **kwargs)`` and :func:`measure_cost` it on an
    ``input_size`` image; with ``shapes_only`` the model is built and run on the ``meta`` device
    (same counts, no memory, no arithmetic)."""
    import timm

    import pale  # noqa: F401  (registers the models)

    model = timm.create_model(model_name, device="meta" if shapes_only else None, **kwargs)
    return measure_cost(model, input_size, in_chans=kwargs.get("in_chans", 3))


# ============================================================================================
# Analytic: one attention layer
# ============================================================================================

def global_attention_macs(h: int, w: int, c: int) -> int:
    """Eq. 4: global self-attention with linear q/k/v and output projections, ``4hwc² + 2c(hw)²``."""
    return 4 * h * w * c * c + 2 * c * (h * w) ** 2


def pale_attention_macs(h: int, w: int, c: int, pale_size: Pair) -> int:
    """Eq. 5 / 16: parallel PS-attention, ``4hwc² + hwc(s_c h + s_r w + 27)``, as printed (no padding)."""
    s_r, s_c = pale_size
    return 4 * h * w * c * c + h * w * c * (s_c * h + s_r * w + 27)


def attention_matmul_macs(mode: str, h: int, w: int, c: int, group_size: Pair,
                          direction: Optional[str] = None, formula: str = "code") -> int:
    """Multiply-adds of the attention matmuls (q·k and attention·v) of one layer on an ``h x w x c`` map:
    the registered mode's own count (:class:`pale.models.AttentionMode`).

    Args:
        mode: an attention mode (see :data:`pale.ATTN_MODES`).
        group_size: ``(s_r, s_c)``: the pale size, ``(1, 1)`` for axial, the stripe width for cross_shaped.
        direction: ``'row'`` or ``'column'``, for ``sequential``.
        formula: ``'code'``, what our implementation computes (padded groups); ``'paper'``, the
            paper's formula on the real map (Eq. 14; for vanilla the same as ``'code'``, since the
            paper's pales are defined on the padded map).
    """
    if formula not in ("code", "paper"):
        raise InputError(f"formula must be 'code' or 'paper', got {formula!r}")
    try:
        entry = attention_mode(mode)
    except ValueError as err:
        raise InputError(str(err)) from None
    layout = AttentionLayout(mode, tuple(group_size), entry.interlaced, direction)
    return entry.matmul_macs(layout, h, w, c, formula == "code")


# ============================================================================================
# Analytic: the network
# ============================================================================================

@dataclass(frozen=True)
class PaleConfig:
    """The constructor arguments of :class:`pale.PaleTransformer` that its cost depends on."""

    embed_dims: Tuple[int, ...]
    depths: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    pale_size: Tuple[Pair, ...]
    attn_mode: str
    stripe_width: Tuple[Pair, ...]
    mlp_ratio: float
    pos_embed: str
    num_classes: int
    in_chans: int
    img_size: Pair
    stem_type: str = "overlap"

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "PaleConfig":
        """From ``PaleTransformer(**kwargs)`` arguments, as the model checks and resolves them (its
        defaults, per-stage pairs): a model built on the ``meta`` device, which costs no memory."""
        model = PaleTransformer(**kwargs, device="meta")
        return cls(model.embed_dims, model.depths, model.num_heads, model.pale_sizes, model.attn_mode,
                   model.stripe_widths, float(model.mlp_ratio), model.pos_embed_mode, int(model.num_classes),
                   int(model.in_chans), model.img_size, model.stem_type)

    @classmethod
    def from_model_name(cls, model_name: str, **overrides: Any) -> "PaleConfig":
        """A registered variant (``pale_tiny`` ...) with optional constructor overrides."""
        if model_name not in MODEL_ARGS:
            raise InputError(f"no analytic cost model for {model_name!r}; known: {sorted(MODEL_ARGS)}")
        return cls.from_kwargs(**dict(MODEL_ARGS[model_name], **overrides))

    def layout(self, stage: int, block: int = 0) -> AttentionLayout:
        """The model's attention layout of ``block`` in ``stage`` (mode, group size, interlacing, direction)."""
        return attention_layout(self.attn_mode, self.pale_size[stage], self.stripe_width[stage],
                                block_direction(self.attn_mode, block))

    def group_size(self, stage: int) -> Pair:
        """Group size the attention of ``stage`` uses: pale size, (1, 1) for axial, stripe width for CSWin."""
        return self.layout(stage).group_size


@dataclass(frozen=True)
class LayerMacs:
    """One counted operation. ``name`` is the module path (``stages.0.blocks.1.attn.q``); the
    attention matmuls, which belong to no sub-module, are ``<block>.attn.matmul``."""

    name: str
    size: Pair          # (h, w) of the layer's output map
    dim: int            # output channels
    macs: int           # what our code computes
    paper_macs: int     # the paper's formula (differs from macs only for attention matmuls)


@dataclass
class AnalyticCost:
    """Analytic parameters and multiply-adds of a Pale model at one input size."""

    config: PaleConfig
    img_size: Pair
    params: int
    params_by_part: Dict[str, int]
    layers: List[LayerMacs]

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def paper_macs(self) -> int:
        return sum(layer.paper_macs for layer in self.layers)

    def macs_under(self, prefix: str) -> int:
        """Multiply-adds of the module at ``prefix`` and everything inside it."""
        return sum(layer.macs for layer in self.layers
                   if layer.name == prefix or layer.name.startswith(prefix + "."))

    @property
    def macs_by_part(self) -> Dict[str, int]:
        return {part: self.macs_under(part) for part in self.params_by_part}

    def attention_macs(self, formula: str = "code") -> int:
        """Multiply-adds of all attention matmuls."""
        return sum(layer.macs if formula == "code" else layer.paper_macs
                   for layer in self.layers if layer.name.endswith(".attn.matmul"))


def _conv_layer(name: str, h: int, w: int, c_in: int, c_out: int, kernel: int, groups: int = 1) -> LayerMacs:
    macs = h * w * c_out * (c_in // groups) * kernel * kernel
    return LayerMacs(name, (h, w), c_out, macs, macs)


def _deep_stem_layers(h_img: int, w_img: int, h: int, w: int, c_in: int, dim: int) -> List[LayerMacs]:
    """The convolutions of :class:`pale.models.pale_transformer.DeepConvStem`: two 3x3 at the image's size,
    two 3x3 and the 1x1 at the pooled ``(h, w)``."""
    half = max(dim // 2, 1)
    return [_conv_layer("stem.convs.0.conv", h_img, w_img, c_in, half, 3),
            _conv_layer("stem.convs.1.conv", h_img, w_img, half, half, 3),
            _conv_layer("stem.convs.3.conv", h, w, half, dim, 3),
            _conv_layer("stem.convs.4.conv", h, w, dim, dim, 3),
            _conv_layer("stem.pointwise", h, w, dim, dim, 1)]


def _linear_layer(name: str, h: int, w: int, c_in: int, c_out: int) -> LayerMacs:
    macs = h * w * c_in * c_out
    return LayerMacs(name, (h, w), c_out, macs, macs)


def _block_layers(prefix: str, cfg: PaleConfig, stage: int, block: int, h: int, w: int) -> List[LayerMacs]:
    """The counted operations of one block on an ``h x w`` map (Eq. 6-8, 13-16)."""
    c = cfg.embed_dims[stage]
    hidden = int(c * cfg.mlp_ratio)
    layout = cfg.layout(stage, block)
    mode, group, direction = layout.mode, layout.group_size, layout.direction
    layers = []
    if cfg.pos_embed == "cpe":
        layers.append(_conv_layer(f"{prefix}.cpe.proj", h, w, c, c, 3, groups=c))
    for proj in ("q", "k", "v"):  # Eq. 13: 3 (9hwc + hwc²)
        layers.append(_conv_layer(f"{prefix}.attn.{proj}.dw", h, w, c, c, 3, groups=c))
        layers.append(_linear_layer(f"{prefix}.attn.{proj}.pw", h, w, c, c))
    layers.append(LayerMacs(f"{prefix}.attn.matmul", (h, w), c,
                            attention_matmul_macs(mode, h, w, c, group, direction, "code"),
                            attention_matmul_macs(mode, h, w, c, group, direction, "paper")))
    layers.append(_linear_layer(f"{prefix}.attn.proj", h, w, c, c))  # Eq. 15
    layers.append(_linear_layer(f"{prefix}.mlp.fc1", h, w, c, hidden))
    layers.append(_linear_layer(f"{prefix}.mlp.fc2", h, w, hidden, c))
    return layers


def _block_params(c: int, hidden: int, cpe: bool) -> int:
    cpe_params = 9 * c + c if cpe else 0
    projection = 9 * c + 2 * c + c * c + c           # depthwise (no bias), BatchNorm, pointwise
    attn = 3 * projection + c * c + c
    mlp = c * hidden + hidden + hidden * c + c
    return cpe_params + 2 * c + attn + 2 * c + mlp    # + norm1, norm2


def analytic_cost(cfg: PaleConfig, img_size: Pair) -> AnalyticCost:
    """Analytic parameters and per-layer multiply-adds of a ``PaleTransformer`` on one
    ``(1, in_chans, H, W)`` image. Layer names follow the model's module paths."""
    h_img, w_img = as_pair(tuple(img_size), "img_size")
    if h_img < 3 or w_img < 3:
        raise InputError(f"images must be at least 3x3 for the Pale stem, got {(h_img, w_img)}")
    dims = cfg.embed_dims
    layers: List[LayerMacs] = []
    params: Dict[str, int] = {}

    grids = stage_sizes((h_img, w_img), len(dims), cfg.stem_type)
    h, w = grids[0]
    if cfg.stem_type == "deep":
        layers.extend(_deep_stem_layers(h_img, w_img, h, w, cfg.in_chans, dims[0]))
        half = max(dims[0] // 2, 1)  # 3x3 convolutions without bias, each with a BatchNorm; then 1x1 and LayerNorm
        params["stem"] = (9 * (cfg.in_chans * half + half * half + half * dims[0] + dims[0] * dims[0])
                          + 2 * (2 * half + 2 * dims[0]) + dims[0] * dims[0] + dims[0] + 2 * dims[0])
    else:
        layers.append(_conv_layer("stem.proj", h, w, cfg.in_chans, dims[0], 7))
        params["stem"] = cfg.in_chans * dims[0] * 49 + dims[0] + 2 * dims[0]
    # APE: one learned table per stage at the stage's grid for the model's img_size; resized (not
    # counted) for other inputs.
    ape_grids = stage_sizes(cfg.img_size, len(dims), cfg.stem_type) if cfg.pos_embed == "ape" else None

    in_dim = dims[0]
    for i, (c, depth) in enumerate(zip(dims, cfg.depths)):
        stage = f"stages.{i}"
        stage_params = 0
        if i > 0:
            h, w = grids[i]
            layers.append(_conv_layer(f"{stage}.downsample.proj", h, w, in_dim, c, 3))
            stage_params += in_dim * c * 9 + c + 2 * c
        if ape_grids is not None:
            stage_params += ape_grids[i][0] * ape_grids[i][1] * c
        hidden = int(c * cfg.mlp_ratio)
        for j in range(depth):
            layers.extend(_block_layers(f"{stage}.blocks.{j}", cfg, i, j, h, w))
            stage_params += _block_params(c, hidden, cfg.pos_embed == "cpe")
        params[stage] = stage_params
        in_dim = c

    params["norm"] = 2 * dims[-1]
    if cfg.num_classes > 0:
        layers.append(LayerMacs("head.fc", (1, 1), cfg.num_classes, dims[-1] * cfg.num_classes,
                                dims[-1] * cfg.num_classes))
        params["head"] = dims[-1] * cfg.num_classes + cfg.num_classes
    else:
        params["head"] = 0
    return AnalyticCost(cfg, (h_img, w_img), sum(params.values()), params, layers)


def stage_sizes(img_size: Pair, num_stages: int = 4, stem_type: str = "overlap") -> List[Pair]:
    """``(h, w)`` of each stage's token map for an ``(H, W)`` image (stem /4, or /2 for the deep stem,
    then /2 per stage)."""
    return stage_grids(tuple(img_size), num_stages, stem_type)


def global_model_macs(cfg: PaleConfig, img_size: Pair) -> int:
    """The network with every attention layer replaced by global attention (Eq. 4, linear q/k/v):
    the analytic total minus each layer's q/k/v, matmuls and projection, plus Eq. 4."""
    cost = analytic_cost(cfg, img_size)
    total = cost.macs
    for layer in cost.layers:
        if layer.name.endswith(".attn.matmul"):
            h, w = layer.size
            block = layer.name[: -len(".attn.matmul")]
            total += global_attention_macs(h, w, layer.dim) - cost.macs_under(f"{block}.attn")
    return total


def relative_difference(a: float, b: float) -> float:
    """``|a - b| / b`` (0 when both are 0)."""
    return 0.0 if a == b else abs(a - b) / abs(b) if b else math.inf


# ============================================================================================
# The paper's ablation tables (Pale-T, Tables 7-9 of the appendix)
# ============================================================================================

@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Tables 7-9: a Pale-T variant and its reported params and FLOPs on
    ImageNet-1K (224x224), and of the UperNet (ADE20K, 512x2048) and Mask R-CNN (COCO, 1280x800)
    built on it."""

    table: str
    label: str
    overrides: Tuple[Tuple[str, Any], ...]   # PaleTransformer arguments changed from Pale-T
    params: float
    macs: float
    ade20k: Tuple[float, float]               # (params, FLOPs) of UperNet at 512x2048
    coco: Tuple[float, float]                 # (params, FLOPs) of Mask R-CNN at 1280x800


def _rows(table: str, rows: Sequence[Tuple[str, Dict[str, Any], Tuple[float, ...]]]) -> Tuple[PaperRow, ...]:
    return tuple(PaperRow(table, label, tuple(kw.items()), params, macs, (ade_p * 1e6, ade_f * 1e9),
                          (coco_p * 1e6, coco_f * 1e9))
                 for label, kw, (params, macs, ade_p, ade_f, coco_p, coco_f) in rows)


# (ImageNet params, FLOPs, ADE20K params M, FLOPs G, COCO params M, FLOPs G), as printed
PAPER_TABLES: Dict[str, Tuple[str, Tuple[PaperRow, ...]]] = {
    "7": ("Table 7: pale size in all four stages", _rows("7", [
        ("1 1 1 1", dict(pale_size=1), (22e6, 3.8e9, 52, 929, 41, 253)),
        ("3 3 3 3", dict(pale_size=3), (22e6, 4.1e9, 52, 950, 41, 269)),
        ("5 5 5 5", dict(pale_size=5), (22e6, 4.4e9, 52, 972, 41, 283)),
        ("7 7 7 7", dict(pale_size=7), (22e6, 4.2e9, 52, 996, 41, 306)),
        ("9 9 9 9", dict(pale_size=9), (22e6, 5.4e9, 52, 1021, 41, 322)),
    ])),
    "8": ("Table 8: attention mode", _rows("8", [
        ("Axial", dict(attn_mode="axial"), (22e6, 3.8e9, 52, 929, 41, 253)),
        ("Cross-Shaped", dict(attn_mode="cross_shaped"), (22e6, 4.2e9, 52, 996, 41, 306)),
        ("Pale (vanilla)", dict(attn_mode="vanilla"), (22e6, 5.4e9, 52, 2677, 41, 668)),
        ("Pale (sequential)", dict(attn_mode="sequential"), (22e6, 4.2e9, 52, 996, 41, 306)),
        ("Pale (parallel)", dict(attn_mode="parallel"), (22e6, 4.2e9, 52, 996, 41, 306)),
    ])),
    "9": ("Table 9: position encoding", _rows("9", [
        ("no pos.", dict(pos_embed="none"), (22e6, 4.2e9, 51, 996, 41, 306)),
        ("APE", dict(pos_embed="ape"), (22e6, 4.2e9, 59, 996, 49, 306)),
        ("CPE", dict(pos_embed="cpe"), (22e6, 4.2e9, 52, 996, 41, 306)),
    ])),
}


@dataclass
class ComparisonRow:
    """A paper row next to our analytic and measured counts (``measured_*`` None when not measured)."""

    paper: PaperRow
    analytic_params: int
    analytic_macs: int
    formula_macs: int           # the paper's equations on the unpadded maps (see module docstring)
    measured_params: Optional[int] = None
    measured_macs: Optional[int] = None


def compare_paper(tables: Sequence[str] = ("7", "8", "9"), measure: bool = True, shapes_only: bool = True,
                  img_size: Pair = (224, 224), model_name: str = "pale_tiny") -> List[ComparisonRow]:
    """The rows of the paper's Tables 7-9 with our analytic and (if ``measure``) measured counts.
    Identical configurations (size 7 = parallel = CPE) are measured once."""
    unknown = [t for t in tables if t not in PAPER_TABLES]
    if unknown:
        raise InputError(f"unknown paper table(s) {unknown}; expected some of {sorted(PAPER_TABLES)}")
    measured: Dict[PaleConfig, ModelCost] = {}
    out = []
    for table in tables:
        for row in PAPER_TABLES[table][1]:
            analytic = analytic_cost(PaleConfig.from_model_name(model_name, **dict(row.overrides)), img_size)
            result = ComparisonRow(row, analytic.params, analytic.macs, analytic.paper_macs)
            if measure:
                key = analytic.config
                if key not in measured:
                    measured[key] = measured_cost(model_name, img_size, shapes_only, **dict(row.overrides))
                result.measured_params, result.measured_macs = measured[key].params, measured[key].macs
            out.append(result)
    return out
