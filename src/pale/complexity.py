"""Parameter and multiply-add counts of Pale models, measured by running them.

Multiply-adds ("FLOPs" in the paper) are counted by ``torch.utils.flop_counter.FlopCounterMode``
(which reports 2 FLOPs per multiply-add) with scaled-dot-product attention forced onto its math
backend: the fused CPU kernels are invisible to the counter. Counted: convolutions, linear layers
and attention matmuls; not counted: norms, activations, softmax, additions (as in the paper).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class ModelCost:
    """Parameters and multiply-adds of a model at one input size, in total and per part."""

    img_size: Tuple[int, int]
    params: int
    macs: int
    params_by_part: Dict[str, int] = field(default_factory=dict)
    macs_by_part: Dict[str, int] = field(default_factory=dict)


def _part_of(name: str, parts: Sequence[str]) -> str:
    for part in parts:
        if name == part or name.startswith(part + "."):
            return part
    return "other"


def model_parts(model: nn.Module) -> Tuple[str, ...]:
    """Top-level parts to report: ``stem``, ``stages.0`` ... ``stages.N``, then other children."""
    parts = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and name == "stages":
            parts.extend(f"stages.{i}" for i in range(len(child)))
        else:
            parts.append(name)
    return tuple(parts)


@torch.no_grad()
def measure_cost(model: nn.Module, img_size: Tuple[int, int], in_chans: int = 3) -> ModelCost:
    """Count parameters and multiply-adds of one forward pass of a ``(1, in_chans, H, W)`` input."""
    parts = model_parts(model)
    params_by_part: Dict[str, int] = {}
    for name, p in model.named_parameters():
        key = _part_of(name, parts)
        params_by_part[key] = params_by_part.get(key, 0) + p.numel()
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, *img_size)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    root = type(model).__name__
    macs_by_part = {}
    for part in parts:
        counts = counter.get_flop_counts().get(f"{root}.{part}", {})
        macs_by_part[part] = sum(counts.values()) // 2
    total = counter.get_total_flops() // 2
    return ModelCost(tuple(img_size), sum(params_by_part.values()), total, params_by_part, macs_by_part)
