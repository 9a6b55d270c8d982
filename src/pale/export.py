"""Deployment exports: ONNX with dynamic batch, height and width (checked with onnxruntime),
weights-only safetensors with the model's description as metadata, and the model folder timm's
``save_for_hf`` writes (``timm.create_model("local-dir:" + folder, pretrained=True)``, the Hub).

ONNX and padding. PS-attention pads each map up to a multiple of its group size and masks the
padded keys. The exporters trace the model at one example size (default: the model's input size);
the graph is right at every size because, while traced, the model always pads (by zero rows when
none are needed, with an all-true mask) and runs the row and column branches separately, and its
``padded_length`` rounds up without dividing a negative number, which ONNX would truncate
(docs/deploy.md has the details).

Every export is verified against PyTorch with onnxruntime before it replaces the target file. The
default exporter is the legacy TorchScript one (seconds); torch.export ("dynamo", a minute) is the
fallback when it cannot translate an operator or its graph does not match (docs/deploy.md).
"""
from __future__ import annotations

import contextlib
import json
import re
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

__all__ = ["EXPORTERS", "PAPER_EVAL_CROP", "OnnxCheck", "OnnxExport", "attention_layers", "export_onnx", "check_onnx",
           "export_safetensors", "export_timm_folder", "timm_folder_target", "load_model_for_export"]

EXPORTERS = ("legacy", "dynamo")
Size = Tuple[int, int]
#: The paper's evaluation (Sec. 4.1): resize to 256x256, centre crop 224x224; for a timm folder of a
#: checkpoint that records no evaluation crop of its own.
PAPER_EVAL_CROP = dict(crop_pct=0.875, crop_mode="squash")


@dataclass
class OnnxCheck:
    """onnxruntime against PyTorch at one input shape: ``max|onnx - torch| / max|torch|``."""

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
    modes = {layer.mode for layer in attention_layers(model)}
    if "vanilla" in modes:
        # per_pale_attention picks the pale count with max(ceil(h/s_r), ceil(w/s_c)): a Python choice
        # on sizes that a trace freezes, so one graph cannot serve every size.
        raise InputError("ONNX export with dynamic height and width does not support attn_mode='vanilla' "
                         "(its pale count is a size-dependent Python choice); use --static")


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: the exporter that worked, its opset, the trace size, the checks,
    and why any exporter tried before it failed."""

    exporter: str
    opset: int
    trace_size: Size
    checks: List[OnnxCheck]
    failed: Dict[str, str]


def export_onnx(model: nn.Module, path: PathLike, *, exporter: str = "auto", opset: int = 17,
                trace_size: Optional[Size] = None, dynamic: bool = True, batch: int = 2,
                check_sizes: Sequence[Size] = (), rtol: float = 1e-4,
                metadata: Optional[Mapping[str, Any]] = None) -> OnnxExport:
    """Export ``model`` (eval mode) to ONNX at ``path``, verify it, then move it into place.

    Args:
        exporter: ``'legacy'`` (TorchScript trace, ``dynamo=False``), ``'dynamo'`` (torch.export,
            opset >= 18), or ``'auto'``: legacy, and dynamo if legacy fails to export or to match.
        trace_size: example image size; default the model's input size (``pretrained_cfg``).
        dynamic: batch, height and width as dynamic axes; otherwise every size is fixed.
        check_sizes: image sizes at which onnxruntime must match PyTorch (the trace size is always checked).
        rtol: largest allowed ``max|onnx - torch| / max|torch|``.
        metadata: stored as ONNX ``metadata_props`` (values JSON-encoded).
    Raises:
        InputError: no exporter gave a graph that matches; the target is then untouched.
    """
    if exporter not in EXPORTERS + ("auto",):
        raise InputError(f"unknown exporter {exporter!r}; expected auto or one of {EXPORTERS}")
    # the opsets this torch can write (a private module: if a torch release moves it, the exporter
    # itself refuses a bad opset, with a less direct message)
    lowest = getattr(getattr(torch.onnx, "_constants", None), "ONNX_MIN_OPSET", None)
    highest = getattr(getattr(torch.onnx, "_constants", None), "ONNX_MAX_OPSET", None)
    if lowest is not None and highest is not None and not lowest <= opset <= highest:
        raise InputError(f"ONNX opset {opset} is not one torch {torch.__version__} exports: {lowest} to {highest}")
    model = model.eval()
    if dynamic:
        _check_dynamic_export_supported(model)
    if trace_size is None:
        trace_size = tuple(model.pretrained_cfg["input_size"][1:])
    trace_size = tuple(trace_size)
    sizes = [trace_size] + ([tuple(s) for s in check_sizes if tuple(s) != trace_size] if dynamic else [])
    _check_model_runs_at(model, sizes)
    failed: Dict[str, str] = {}
    for name in (EXPORTERS if exporter == "auto" else (exporter,)):
        used_opset = opset if name == "legacy" else max(opset, 18)
        try:
            checks = _export_checked(model, path, name, used_opset, trace_size, dynamic, batch, sizes, rtol, metadata)
        except ValueError as err:
            failed[name] = str(err)
            continue
        return OnnxExport(name, used_opset, trace_size, checks, failed)
    raise InputError("; ".join(f"{msg}" for msg in failed.values()) + f"; {path} was not written")


def _check_model_runs_at(model: nn.Module, sizes: Sequence[Size]) -> None:
    """Run ``model`` eagerly on one image of every size, so that a size the model refuses is one line
    naming the size, not a failed trace followed by a failed torch.export of the same input."""
    in_chans = getattr(model, "in_chans", 3)
    with torch.no_grad():
        for size in sizes:
            try:
                model(torch.zeros(1, in_chans, *size))
            except (ValueError, TypeError, RuntimeError) as err:
                raise InputError(f"the model does not run on {size[0]}x{size[1]} images (trace or check "
                                 f"size): {err}") from None


def _export_checked(model: nn.Module, path: PathLike, exporter: str, opset: int, trace_size: Size,
                    dynamic: bool, batch: int, sizes: Sequence[Size], rtol: float,
                    metadata: Optional[Mapping[str, Any]]) -> List[OnnxCheck]:
    """One exporter: export to a temporary file, add metadata, check, rename into place."""
    import onnx

    example = torch.randn(batch, getattr(model, "in_chans", 3), *trace_size)
    with files.atomic_path(path) as tmp:
        onnx_tmp = tmp.with_name(tmp.name + ".onnx")  # the dynamo exporter wants an .onnx suffix
        try:
            with warnings.catch_warnings(), _clear_exporter_errors(exporter):
                warnings.simplefilter("ignore")  # TracerWarnings about the size checks: expected, see above
                if exporter == "legacy":
                    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}} if dynamic else None
                    torch.onnx.export(model, (example,), str(onnx_tmp), dynamo=False, opset_version=opset,
                                      input_names=["image"], output_names=["logits"], dynamic_axes=axes)
                else:
                    from torch.export import Dim
                    shapes = {"x": {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}} if dynamic else None
                    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                                input_names=["image"], output_names=["logits"],
                                                dynamic_shapes=shapes, verbose=False)
                    program.save(str(onnx_tmp), external_data=False)
            proto = onnx.load(str(onnx_tmp))
            for key, value in (metadata or {}).items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, json.dumps(value)
            onnx.save(proto, str(tmp))
        finally:
            if onnx_tmp.exists():
                onnx_tmp.unlink()
        checks = check_onnx(tmp, model, sizes, batch=batch)
        worst = max(checks, key=lambda c: c.max_rel_err)
        if not worst.max_rel_err <= rtol:
            raise InputError(f"the {exporter} ONNX export does not match PyTorch: relative error "
                             f"{worst.max_rel_err:.3g} > {rtol:g} at input {worst.shape}")
    return checks


@contextlib.contextmanager
def _clear_exporter_errors(exporter: str) -> Iterator[None]:
    """An operator the exporter cannot translate becomes one InputError line, not a graph dump."""
    try:
        yield
    except torch.onnx.errors.OnnxExporterError as err:
        first = str(err).strip().splitlines()[-1 if exporter == "legacy" else 0]
        first = re.sub(r"\x1b\[[0-9;]*m", "", first)  # the dynamo exporter colours its messages
        raise InputError(f"the {exporter} ONNX exporter cannot export this model: {first}") from None


def check_onnx(path: PathLike, model: nn.Module, sizes: Sequence[Size], batch: int = 2,
               seed: int = 0) -> List[OnnxCheck]:
    """Run the ONNX file with onnxruntime and ``model`` with PyTorch on the same random images."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    in_chans = getattr(model, "in_chans", 3)
    checks = []
    for h, w in sizes:
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
