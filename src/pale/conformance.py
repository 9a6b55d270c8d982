"""The paper's printed numbers next to ours, in one table (``pale info --compare-paper``).

Rows, each with the paper's value, our analytic value and the value measured on the built model:

* Table 1: embedding dims, heads, depths, pale sizes, MLP ratio and patch-merging strides of
  Pale-T/S/B, read from models built on the ``meta`` device (analytic: the registered arguments).
* Table 2: parameters and FLOPs of Pale-T/S/B at 224x224.
* Tables 3 and 4: the full Mask R-CNN (COCO, 1280x800) and UperNet (ADE20K, 512x2048) models.
* Tables 7, 8, 9: every Pale-T row in all three columns: ImageNet-1K 224x224, ADE20K 512x2048,
  COCO 1280x800.

Analytic counts come from :mod:`pale.complexity` (the paper's equations for what the code
computes). For the dense models the analytic value is the analytic backbone plus the decoder and
heads measured once per variant: those do not depend on the attention mode, pale size or position
encoding. Measured counts run each model on ``meta`` (shapes only, the same counts as a CPU run).

A measured number within :data:`TOLERANCE` of the paper agrees; every other row carries a one-line
reason (:data:`REASONS`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .complexity import PAPER_TABLES, ModelCost, PaleConfig, analytic_cost, measure_cost
from .errors import InputError

__all__ = ["TOLERANCE", "TABLES", "ConformanceRow", "conformance_rows", "format_conformance", "REASONS", "reason_for"]

Pair = Tuple[int, int]
Value = Union[float, str, None]

TOLERANCE = 0.02
TABLES = ("1", "2", "3", "4", "7", "8", "9")
VARIANTS = {"pale_tiny": "Pale-T", "pale_small": "Pale-S", "pale_base": "Pale-B"}

#: Table 1 as printed: C_i, H_i, depths, S_i, R_i, P_i per stage
PAPER_TABLE1: Dict[str, Dict[str, Tuple[Any, ...]]] = {
    "pale_tiny": dict(dims=(64, 128, 256, 512), heads=(2, 4, 8, 16)),
    "pale_small": dict(dims=(96, 192, 384, 768), heads=(2, 4, 8, 16)),
    "pale_base": dict(dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32)),
}
TABLE1_SHARED = dict(depths=(2, 2, 16, 2), pale_size=(7, 7, 7, 7), mlp_ratio=(4, 4, 4, 4), merge_stride=(4, 2, 2, 2))
#: Table 2 (ImageNet-1K, 224x224): params, FLOPs
PAPER_CLASSIFIERS = {"pale_tiny": (22e6, 4.2e9), "pale_small": (48e6, 9.0e9), "pale_base": (85e6, 15.6e9)}

#: the dense columns: (task label, ``pale info`` kind, input (H, W))
DENSE = {"ade20k": ("ADE20K UperNet 512x2048", "upernet", (512, 2048)),
         "coco": ("COCO Mask R-CNN 1280x800", "maskrcnn", (800, 1280))}
IMAGENET = "ImageNet 224x224"

_COCO = ("every Mask R-CNN 2.2-3.2% under: ours counts convs, linears and attention matmuls only; mmdetection's "
         "counter also counts norms, activations and upsampling (docs/dense.md)")
_TABLE7 = ("the paper's Table 7 FLOPs are irregular (size 5 above size 7; size 9 equals vanilla's 5.4G); "
           "ours rise with the pale size as Eq. 16 does (docs/complexity.md)")
#: why a row may differ from the paper by more than TOLERANCE: (source, item, quantity) -> reason;
#: None matches any source or item
REASONS: Dict[Tuple[Optional[str], Optional[str], str], str] = {
    (None, None, f"FLOPs, {DENSE['coco'][0]}"): _COCO,
    ("Table 7", "3 3 3 3", f"FLOPs, {IMAGENET}"): _TABLE7,
    ("Table 7", "5 5 5 5", f"FLOPs, {IMAGENET}"): _TABLE7,
    ("Table 7", "9 9 9 9", f"FLOPs, {IMAGENET}"): _TABLE7,
}


def reason_for(source: str, item: str, quantity: str) -> str:
    """The recorded reason for a row (see :data:`REASONS`), or ``''``."""
    for key in ((source, item, quantity), (None, None, quantity)):
        if key in REASONS:
            return REASONS[key]
    return ""


@dataclass
class ConformanceRow:
    """One number (or one Table 1 entry) of the paper next to ours."""

    source: str                # "Table 8"
    item: str                  # "Pale (vanilla)", "Pale-S"
    quantity: str              # "FLOPs, ADE20K UperNet 512x2048", "heads H_i"
    paper: Value
    analytic: Value = None
    measured: Value = None
    reason: str = ""

    @property
    def ratio(self) -> Optional[float]:
        """measured / paper for numbers."""
        if isinstance(self.paper, (int, float)) and isinstance(self.measured, (int, float)):
            return self.measured / self.paper
        return None

    @property
    def agrees(self) -> Optional[bool]:
        """Within :data:`TOLERANCE` (numbers) or equal (Table 1 entries); None when not measured."""
        if self.measured is None:
            return None
        if self.ratio is not None:
            return abs(self.ratio - 1) <= TOLERANCE
        return self.measured == self.paper


# ---- building and counting -------------------------------------------------------------------

def _slashed(values: Sequence[Any]) -> str:
    return "/".join(str(v) for v in values)


def _table1_of_model(model: Any) -> Dict[str, Tuple[Any, ...]]:
    """What a built ``PaleTransformer`` has per stage: dims, heads, depths, pale sizes, MLP ratio, strides."""
    def one(values: Sequence[Any]) -> Any:   # every block of a stage must agree
        values = set(values)
        return values.pop() if len(values) == 1 else tuple(sorted(values))

    def side(size: Tuple[int, int]) -> Any:
        return size[0] if size[0] == size[1] else f"{size[0]}x{size[1]}"

    stages = list(model.stages)
    strides = [model.stem.proj.stride[0]] + [s.downsample.proj.stride[0] for s in stages[1:]]
    return dict(
        dims=tuple(one(b.attn.dim for b in s.blocks) for s in stages),
        heads=tuple(one(b.attn.num_heads for b in s.blocks) for s in stages),
        depths=tuple(len(s.blocks) for s in stages),
        pale_size=tuple(one(side(b.attn.group_size) for b in s.blocks) for s in stages),
        mlp_ratio=tuple(one(b.mlp.fc1.out_features // b.mlp.fc1.in_features for b in s.blocks) for s in stages),
        merge_stride=tuple(strides))


class _Counter:
    """Builds models on ``meta`` and counts each distinct one once."""

    def __init__(self, measure: bool):
        self.measure = measure
        self._cache: Dict[Any, ModelCost] = {}

    def _count(self, key: Any, build: Callable[[], Any], size: Pair) -> ModelCost:
        if key not in self._cache:
            self._cache[key] = measure_cost(build(), size)
        return self._cache[key]

    def classifier(self, variant: str, overrides: Dict[str, Any]) -> ModelCost:
        import timm

        import pale  # noqa: F401  (registers the models)

        # keyed by the resolved configuration: pale size 7, parallel and CPE are all the default model
        return self._count(("classifier", PaleConfig.from_model_name(variant, **overrides)),
                           lambda: timm.create_model(variant, device="meta", **overrides), (224, 224))

    def dense(self, column: str, variant: str, overrides: Dict[str, Any]) -> ModelCost:
        from .dense.cost import build_maskrcnn_view, build_upernet_view

        _, kind, size = DENSE[column]
        build = build_upernet_view if kind == "upernet" else build_maskrcnn_view
        return self._count((kind, PaleConfig.from_model_name(variant, **overrides)),
                           lambda: build(variant, overrides, "meta"), size)


def _ape_size(column: str) -> Pair:
    """The ``img_size`` the dense builders give an APE backbone for a column's task."""
    if column == "ade20k":
        from .dense.upernet import APE_IMG_SIZE
    else:
        from .dense.maskrcnn import APE_IMG_SIZE
    return APE_IMG_SIZE


def _analytic_backbone(variant: str, overrides: Dict[str, Any], column: str) -> Tuple[int, int]:
    """Analytic (params, multiply-adds) of the dense backbone: the classifier without head and final norm."""
    kwargs = dict(overrides, num_classes=0)
    if kwargs.get("pos_embed") == "ape":
        kwargs["img_size"] = _ape_size(column)
    cost = analytic_cost(PaleConfig.from_model_name(variant, **kwargs), DENSE[column][2])
    return cost.params - cost.params_by_part["norm"], cost.macs


def _dense_numbers(counter: _Counter, column: str, variant: str, overrides: Dict[str, Any]
                   ) -> Tuple[Tuple[int, int], Optional[Tuple[int, int]]]:
    """``(analytic, measured)`` (params, multiply-adds) of a dense model; measured None without measuring."""
    default = counter.dense(column, variant, {})   # decoder and heads, the same for every backbone setting
    rest = (default.params - default.params_by_part["backbone"], default.macs - default.macs_by_part["backbone"])
    params, macs = _analytic_backbone(variant, overrides, column)
    analytic = (params + rest[0], macs + rest[1])
    if not counter.measure:
        return analytic, None
    measured = counter.dense(column, variant, overrides)
    return analytic, (measured.params, measured.macs)


# ---- the rows --------------------------------------------------------------------------------

def _table1_rows(counter: _Counter) -> Iterator[ConformanceRow]:
    import timm

    import pale  # noqa: F401

    names = dict(dims="embed dims C_i", heads="heads H_i", depths="depths", pale_size="pale size S_i",
                 mlp_ratio="MLP ratio R_i", merge_stride="merging stride P_i")
    for variant, label in VARIANTS.items():
        paper = dict(PAPER_TABLE1[variant], **TABLE1_SHARED)
        cfg = PaleConfig.from_model_name(variant)
        analytic = dict(dims=cfg.embed_dims, heads=cfg.num_heads, depths=cfg.depths,
                        pale_size=tuple(s if s == t else f"{s}x{t}" for s, t in cfg.pale_size),
                        mlp_ratio=(int(cfg.mlp_ratio),) * len(cfg.depths), merge_stride=(4, 2, 2, 2))
        measured = None
        if counter.measure:
            measured = _table1_of_model(timm.create_model(variant, device="meta"))
        for key, name in names.items():
            yield ConformanceRow("Table 1", label, name, _slashed(paper[key]), _slashed(analytic[key]),
                                 _slashed(measured[key]) if measured else None)


def _number_rows(source: str, item: str, column_label: str, paper: Tuple[float, float],
                 analytic: Tuple[int, int], measured: Optional[Tuple[int, int]]) -> Iterator[ConformanceRow]:
    for i, quantity in enumerate(("params", "FLOPs")):
        yield ConformanceRow(source, item, f"{quantity}, {column_label}", paper[i], analytic[i],
                             measured[i] if measured else None)


def _classifier_numbers(counter: _Counter, variant: str, overrides: Dict[str, Any]
                        ) -> Tuple[Tuple[int, int], Optional[Tuple[int, int]]]:
    cost = analytic_cost(PaleConfig.from_model_name(variant, **overrides), (224, 224))
    measured = counter.classifier(variant, overrides) if counter.measure else None
    return (cost.params, cost.macs), ((measured.params, measured.macs) if measured else None)


def conformance_rows(tables: Sequence[str] = TABLES, measure: bool = True) -> List[ConformanceRow]:
    """The rows of the paper's ``tables`` (a subset of :data:`TABLES`), with analytic and measured values."""
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise InputError(f"unknown paper table(s) {unknown}; expected some of {list(TABLES)}")
    from .dense.cost import PAPER as PAPER_DENSE

    counter = _Counter(measure)
    rows: List[ConformanceRow] = []
    for table in TABLES:
        if table not in tables:
            continue
        if table == "1":
            rows += _table1_rows(counter)
        elif table == "2":
            for variant, label in VARIANTS.items():
                rows += _number_rows("Table 2", label, IMAGENET, PAPER_CLASSIFIERS[variant],
                                     *_classifier_numbers(counter, variant, {}))
        elif table in ("3", "4"):
            column = "coco" if table == "3" else "ade20k"
            for variant, label in VARIANTS.items():
                paper = PAPER_DENSE[f"{DENSE[column][1]}_{variant}"]
                rows += _number_rows(f"Table {table}", label, DENSE[column][0], paper,
                                     *_dense_numbers(counter, column, variant, {}))
        else:
            for paper_row in PAPER_TABLES[table][1]:
                overrides = dict(paper_row.overrides)
                rows += _number_rows(f"Table {table}", paper_row.label, IMAGENET, (paper_row.params, paper_row.macs),
                                     *_classifier_numbers(counter, "pale_tiny", overrides))
                for column in ("ade20k", "coco"):
                    rows += _number_rows(f"Table {table}", paper_row.label, DENSE[column][0],
                                         getattr(paper_row, column),
                                         *_dense_numbers(counter, column, "pale_tiny", overrides))
    for row in rows:
        row.reason = reason_for(row.source, row.item, row.quantity)
    return rows


def _human(value: Value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    for unit, scale in (("G", 1e9), ("M", 1e6)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}f}{unit}"
    return f"{value:.0f}"


def _paper(value: Value) -> str:
    """The paper's value as printed: whole millions, one decimal of G below 100G, whole G above."""
    if isinstance(value, (int, float)):
        if value >= 1e9:
            return f"{value / 1e9:.1f}G" if value < 1e11 else f"{value / 1e9:.0f}G"
        return f"{value / 1e6:.0f}M"
    return _human(value)


def format_conformance(rows: Sequence[ConformanceRow]) -> str:
    """One text table: source, item, quantity, paper, analytic, measured, measured/paper, and a
    reason for every measured value off the paper by more than :data:`TOLERANCE`."""
    header = ("source", "item", "quantity", "paper", "analytic", "measured", "meas/paper", "note")
    body = []
    for r in rows:
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else ("same" if r.agrees else "-")
        note = "" if r.agrees in (True, None) else (r.reason or "DIFFERS, no reason recorded")
        body.append((r.source, r.item, r.quantity, _paper(r.paper), _human(r.analytic), _human(r.measured), ratio,
                     note))
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header) - 1)]
    lines = []
    for line in [header] + body:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1])
    return "\n".join(line.rstrip() for line in lines) + (
        f"\n\nFLOPs are multiply-adds. analytic: pale.complexity's equations (dense models: analytic backbone "
        f"+ decoder/heads measured); measured: FlopCounterMode over one forward pass on the meta device. "
        f"note: why a measured value is more than {TOLERANCE:.0%} off the paper.")
