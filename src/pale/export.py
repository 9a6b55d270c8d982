"""Deployment exports: ONNX with dynamic batch, height and width (checked with onnxruntime),
weights-only safetensors with the model's description as metadata, and the model folder timm's
``save_for_hf`` writes (``timm.create_model("local-dir:" + folder, pretrained=True)``, the Hub).

ONNX. The default exporter is PyTorch's dynamo one (``torch.onnx.export(..., dynamo=True)``, built on
``torch.export``), with batch, height and width as symbolic dimensions (:data:`DYNAMIC_AXES`); under
``torch.export`` PS-attention always pads each map to a multiple of its group size and masks the
padded keys (by zero rows, all keys real, where nothing needs padding), so the one graph is the model at
every size, the sizes that pad and those that do not. The legacy TorchScript exporter,
kept for runtimes that need an opset below 18 (TorchScript is deprecated in PyTorch), traces one
example the same way. Every export is run with onnxruntime against
PyTorch before it replaces the target file.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import files
from .checkpoint import create_model_from_file, load_weights, read_model_file
from .files import PathLike, save_safetensors
from .errors import InputError

__all__ = ["EXPORTERS", "OPSETS", "DEFAULT_OPSET", "DYNAMIC_AXES", "PAPER_EVAL_CROP", "OnnxCheck", "OnnxExport",
           "attention_layers", "export_onnx", "check_onnx", "check_batch", "export_safetensors",
           "export_timm_folder", "timm_folder_target", "load_model_for_export"]

EXPORTERS = ("dynamo", "legacy")
#: The opsets each exporter writes: dynamo's operator library starts at 18; the TorchScript
#: exporter's range is torch's (7 to 20 in torch 2.14; private constants, hence the fallbacks).
_CONSTANTS = getattr(torch.onnx, "_constants", None)
OPSETS = dict(dynamo=(18, getattr(_CONSTANTS, "ONNX_MAX_OPSET", 23)),
              legacy=(getattr(_CONSTANTS, "ONNX_MIN_OPSET", 7),
                      getattr(_CONSTANTS, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)))
DEFAULT_OPSET = 18
#: The dynamic input dimensions, ``axis: (name, smallest size asked for)``: any batch, images of 3x3
#: or more (the Pale stem's smallest input), no largest size. torch.export may prove a narrower range
#: (the dynamo exporter then narrows it); :attr:`OnnxExport.ranges` is the range it proved.
DYNAMIC_AXES = {0: ("batch", 1), 2: ("height", 3), 3: ("width", 3)}
Size = Tuple[int, int]
#: The paper's evaluation (Sec. 4.1): resize to 256x256, centre crop 224x224; for a timm folder of a
#: checkpoint that records no evaluation crop of its own.
PAPER_EVAL_CROP = dict(crop_pct=0.875, crop_mode="squash")


@dataclass
class OnnxCheck:
    """onnxruntime against PyTorch at one input shape: ``max|onnx - torch|`` and that over ``max|torch|``."""

    shape: Tuple[int, int, int, int]
    max_abs_err: float
    max_rel_err: float

    def as_dict(self) -> Dict[str, Any]:
        return dict(shape=list(self.shape), max_abs_err=self.max_abs_err, max_rel_err=self.max_rel_err)


def attention_layers(model: nn.Module) -> List[nn.Module]:
    """Every attention layer of ``model`` (modules with ``mode`` and ``group_size``)."""
    from .models import GroupedAttention

    return [m for m in model.modules() if isinstance(m, GroupedAttention)]


def _check_dynamic_export_supported(model: nn.Module) -> None:
    from .models import attention_mode

    fixed = sorted({layer.mode for layer in attention_layers(model) if not attention_mode(layer.mode).any_size_graph})
    if fixed:
        # vanilla picks its pale count with max(ceil(h/s_r), ceil(w/s_c)): a Python choice on the
        # size, which neither exporter keeps symbolic (torch.export refuses it, a trace freezes it)
        raise InputError(f"attn_mode={fixed[0]!r} cannot be exported to ONNX with dynamic height and width (its "
                         f"grouping is a Python choice on the image size): export one size with --static "
                         f"[--trace-size H W]")


def check_batch(index: int) -> int:
    """The batch of the ``index``-th onnxruntime check: 1, 2, 3, 1, ... (the dynamic batch is checked too)."""
    return index % 3 + 1


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: the exporter, its opset, the trace size, the checks, the
    seconds the export took (checks excluded) and, for a dynamic dynamo export, the range of each
    dynamic dimension that torch.export proved the graph for, ``name: (smallest, largest or None)``."""

    exporter: str
    opset: int
    trace_size: Size
    checks: List[OnnxCheck]
    seconds: float
    ranges: Optional[Dict[str, Tuple[int, Optional[int]]]] = None

    @property
    def worst(self) -> OnnxCheck:
        return max(self.checks, key=lambda c: c.max_rel_err)


def export_onnx(model: nn.Module, path: PathLike, *, exporter: str = "dynamo", opset: Optional[int] = None,
                trace_size: Optional[Size] = None, dynamic: bool = True, batch: int = 2,
                check_sizes: Sequence[Size] = (), rtol: float = 1e-4,
                metadata: Optional[Mapping[str, Any]] = None) -> OnnxExport:
    """Export ``model`` (eval mode) to ONNX at ``path``, check it with onnxruntime, then move it into place.

    Args:
        exporter: ``'dynamo'`` (``torch.onnx.export(..., dynamo=True)``: torch.export, opset >= 18) or
            ``'legacy'`` (``dynamo=False``: the TorchScript trace, for an opset below 18).
        trace_size: example image size (batch ``batch``); default the model's input size (``pretrained_cfg``).
        dynamic: batch, height and width dynamic (:data:`DYNAMIC_AXES`); otherwise the example's shape is fixed.
        check_sizes: image sizes at which onnxruntime must match PyTorch, the ``i``-th on a batch of
            :func:`check_batch` ``(i)`` images; the trace size is checked first whatever is given. A
            static export is checked at the example's shape only.
        opset: the ONNX opset, default :data:`DEFAULT_OPSET` (within the exporter's :data:`OPSETS`).
        rtol: largest allowed ``max|onnx - torch| / max|torch|``.
        metadata: stored as ONNX ``metadata_props`` (values JSON-encoded).
    Raises:
        InputError: a mode or opset the exporter cannot take, an operator it cannot translate, or a
            check above ``rtol``; the target is then untouched.
    """
    if exporter not in EXPORTERS:
        raise InputError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    lowest, highest = OPSETS[exporter]
    opset = DEFAULT_OPSET if opset is None else opset
    if not lowest <= opset <= highest:
        other = " (the legacy exporter writes lower ones)" if exporter == "dynamo" and opset < lowest else ""
        raise InputError(f"ONNX opset {opset} is not one the {exporter} exporter of torch {torch.__version__} "
                         f"writes: {lowest} to {highest}{other}")
    model = model.eval()
    if dynamic:
        _check_dynamic_export_supported(model)
    trace_size = tuple(trace_size or model.pretrained_cfg["input_size"][1:])
    if dynamic:
        sizes = [trace_size] + [tuple(s) for s in check_sizes if tuple(s) != trace_size]
        shapes = [(check_batch(i), *size) for i, size in enumerate(sizes)]
    else:
        shapes = [(batch, *trace_size)]
    _check_model_runs_at(model, [trace_size] + [s[1:] for s in shapes])
    if dynamic:
        _check_example_size(model, trace_size)
    import onnx

    start = time.perf_counter()
    with files.atomic_path(path) as tmp:  # the export, its metadata and the checks all happen on tmp
        example = torch.randn(batch, getattr(model, "in_chans", 3), *trace_size)
        ranges = None
        onnx_tmp = tmp.with_name(tmp.name + ".onnx")  # the dynamo exporter wants an .onnx suffix
        try:
            with warnings.catch_warnings(), _clear_exporter_errors(exporter):
                warnings.simplefilter("ignore")  # TracerWarnings about the size checks: expected, see above
                if exporter == "legacy":
                    axes = {"image": {i: name for i, (name, _) in DYNAMIC_AXES.items()}, "logits": {0: "batch"}}
                    torch.onnx.export(model, (example,), str(onnx_tmp), dynamo=False, opset_version=opset,
                                      input_names=["image"], output_names=["logits"],
                                      dynamic_axes=axes if dynamic else None)
                else:
                    from torch.export import Dim

                    # positional (not by the argument's name), so that any timm model's forward takes it
                    dims = ({i: Dim(name, min=low) for i, (name, low) in DYNAMIC_AXES.items()},) if dynamic else None
                    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                                input_names=["image"], output_names=["logits"],
                                                dynamic_shapes=dims, verbose=False)
                    program.save(str(onnx_tmp), external_data=False)
                    ranges = _proven_ranges(program.exported_program) if dynamic else None
            proto = onnx.load(str(onnx_tmp))
            for key, value in (metadata or {}).items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, json.dumps(value)
            onnx.save(proto, str(tmp))
        finally:
            if onnx_tmp.exists():
                onnx_tmp.unlink()
        seconds = time.perf_counter() - start
        checks = check_onnx(tmp, model, shapes)
        result = OnnxExport(exporter, opset, trace_size, checks, seconds, ranges)
        if not result.worst.max_rel_err <= rtol:
            raise InputError(f"the {exporter} ONNX export does not match PyTorch: relative error "
                             f"{result.worst.max_rel_err:.3g} > {rtol:g} at input {result.worst.shape}; "
                             f"{path} was not written")
    return result


def _check_model_runs_at(model: nn.Module, sizes: Sequence[Size]) -> None:
    """Run ``model`` eagerly on one image of every size, so that a size the model refuses is one line
    naming the size, not a failed export."""
    in_chans = getattr(model, "in_chans", 3)
    with torch.no_grad():
        for size in dict.fromkeys(tuple(s) for s in sizes):
            try:
                model(torch.zeros(1, in_chans, *size))
            except (ValueError, TypeError, RuntimeError) as err:
                raise InputError(f"the model does not run on {size[0]}x{size[1]} images (trace or check "
                                 f"size): {err}") from None


def _check_example_size(model: nn.Module, size: Size) -> None:
    """Refuse an example size at which an attention layer's map has a side of 1: the exporters fix
    such a size in the graph (torch.export specialises every size it sees as 1)."""
    seen: List[Tuple[int, int]] = []
    hooks = [layer.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[1:3])))
             for layer in attention_layers(model)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, getattr(model, "in_chans", 3), *size))
    finally:
        for hook in hooks:
            hook.remove()
    if any(1 in hw for hw in seen):
        smallest = min(seen, key=min)
        raise InputError(f"a {size[0]}x{size[1]} example gives an attention layer a {smallest[0]}x{smallest[1]} map, "
                         f"which a dynamic export would fix in the graph: use a larger --trace-size")


def _proven_ranges(program: torch.export.ExportedProgram) -> Dict[str, Tuple[int, Optional[int]]]:
    """The range of each of :data:`DYNAMIC_AXES` for which ``program`` holds (a fixed size: one value)."""
    image = next(n for n in program.graph.nodes if n.op == "placeholder"
                 and n.name == program.graph_signature.user_inputs[0])
    ranges = {}
    for axis, (name, _) in DYNAMIC_AXES.items():
        size = image.meta["val"].shape[axis]
        if isinstance(size, torch.SymInt):
            bound = program.range_constraints[size.node.expr]
            upper = int(bound.upper) if bound.upper.is_Integer else None  # else torch's integer infinity
            ranges[name] = (int(bound.lower), upper)
        else:
            ranges[name] = (int(size), int(size))
    return ranges


@contextlib.contextmanager
def _clear_exporter_errors(exporter: str) -> Iterator[None]:
    """An operator or a model the exporter cannot take becomes one InputError line, not a report."""
    try:
        yield
    except torch.onnx.errors.OnnxExporterError as err:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # the dynamo exporter colours its messages
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if exporter == "legacy":
            line = lines[-1]
        else:  # its first line names the step that failed; the cause follows "## Exception summary"
            cause = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "## Exception summary"), None)
            line = lines[0] + (f" {cause}" if cause else "")
        raise InputError(f"the {exporter} ONNX exporter cannot export this model: {line}") from None


def check_onnx(path: PathLike, model: nn.Module, shapes: Sequence[Tuple[int, int, int]],
               seed: int = 0) -> List[OnnxCheck]:
    """Run the ONNX file with onnxruntime and ``model`` with PyTorch on the same random images, a batch
    of ``(batch, height, width)`` for each entry of ``shapes``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    in_chans = getattr(model, "in_chans", 3)
    checks = []
    for batch, h, w in shapes:
        x = torch.randn(batch, in_chans, h, w, generator=gen)
        with torch.no_grad():
            ref = model(x).double()
        out = torch.from_numpy(session.run(None, {name: x.numpy()})[0]).double()
        if out.shape != ref.shape:
            raise InputError(f"ONNX output shape {tuple(out.shape)} != PyTorch {tuple(ref.shape)} at input {tuple(x.shape)}")
        abs_err = float((out - ref).abs().max())
        checks.append(OnnxCheck(tuple(x.shape), abs_err, abs_err / max(float(ref.abs().max()), 1e-12)))
    return checks


def load_model_for_export(model_name: Optional[str], checkpoint: Optional[PathLike],
                          weights: str = "best") -> Tuple[nn.Module, Dict[str, Any]]:
    """The model a checkpoint holds (``model_name``, when given, must match the one it records), or
    a freshly initialised ``model_name``. A bare state dict needs ``model_name``."""
    import timm
    if model_name is not None and not timm.is_model(model_name):
        known = ", ".join(timm.list_models("pale_*"))
        raise InputError(f"unknown model {model_name!r} (Pale models: {known}; any timm model name works)")
    if checkpoint is None:
        if model_name is None:
            raise InputError("nothing to export: give a checkpoint (-c FILE) or a model name for fresh weights")
        return timm.create_model(model_name).eval(), dict(model_name=model_name, model_kwargs={}, class_names=None,
                                                          weights="raw", weights_reason="freshly initialised")
    state, info = read_model_file(checkpoint, weights)
    stored = info.get("model_name")
    if stored and model_name and stored != model_name:
        raise InputError(f"{checkpoint} holds a {stored}, not a {model_name}")
    if stored:
        return create_model_from_file(checkpoint, weights=weights)
    if model_name is None:
        raise InputError(f"{checkpoint} does not record its model: give the model name, e.g. pale export pale_tiny -c FILE")
    # A bare state dict: build MODEL with the checkpoint's class count.
    kwargs: Dict[str, Any] = {}
    if "head.fc.weight" in state:
        kwargs["num_classes"] = int(state["head.fc.weight"].shape[0])
    model = timm.create_model(model_name, **kwargs)
    load_weights(model, state, source=str(checkpoint))
    return model.eval(), dict(info, model_name=model_name, model_kwargs=kwargs)


def export_safetensors(model: nn.Module, info: Mapping[str, Any], path: PathLike) -> None:
    """Weights alone, with ``model_name``, ``model_kwargs``, ``class_names``, ``weights`` (which set:
    raw or ema) and, when known, ``data_config`` as metadata; loadable by :func:`pale.checkpoint.create_model_from_file` and by timm's
    ``pretrained_cfg_overlay=dict(file=...)``."""
    meta = {k: info.get(k) for k in ("model_name", "model_kwargs", "class_names", "weights")}
    if info.get("data_config") is not None:
        meta["data_config"] = info["data_config"]
    save_safetensors(model.state_dict(), path, metadata=meta)


def timm_folder_target(folder: PathLike) -> Path:
    """``folder`` as the target of a timm folder export: new, empty, or a timm model folder (it holds a
    ``config.json``), which the export replaces; a folder of other files or a file is refused."""
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise InputError(f"cannot write the folder {target}: it is a file")
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file():
        raise InputError(f"{target} is a folder of other files, not a timm model folder (no config.json): "
                         f"name a new or empty folder")
    return target


def export_timm_folder(model: nn.Module, info: Mapping[str, Any], folder: PathLike) -> Dict[str, Any]:
    """The folder ``timm.models.save_for_hf`` writes (``config.json``, ``model.safetensors``), written
    whole or not at all (:func:`pale.files.atomic_folder`); returns the ``pretrained_cfg`` it holds.

    The config records the architecture, its settings (``model_args``), ``num_classes``, the class
    names as ``label_names`` and, as ``pretrained_cfg``, the evaluation preprocessing the checkpoint
    records (input size, interpolation, mean, std, crop), the crop being :data:`PAPER_EVAL_CROP` where it
    records none. An existing folder is replaced only if it is empty or a timm model folder
    (:func:`timm_folder_target`).
    """
    from timm.models import save_for_hf

    from .predict import resolve_preprocessing

    target = timm_folder_target(folder)
    # the checkpoint's record first, then the paper's crop (resolve_preprocessing falls back to the model's cfg)
    model.pretrained_cfg = dict(model.pretrained_cfg, **PAPER_EVAL_CROP)
    preprocessing = resolve_preprocessing(info, model)
    model.pretrained_cfg = dict(model.pretrained_cfg, **preprocessing)
    # timm's factory leaves drop rates out of the settings it records; the stored ones do the same
    model_args = {k: v for k, v in (info.get("model_kwargs") or {}).items() if not k.endswith("drop_rate")
                  and k != "drop_path_rate"}
    model_config = dict(label_names=list(info["class_names"])) if info.get("class_names") else None
    with files.atomic_folder(target) as tmp:
        save_for_hf(model, str(tmp), model_config=model_config, model_args=model_args, safe_serialization=True)
    return preprocessing
