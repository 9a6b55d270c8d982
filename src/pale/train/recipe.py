"""Training recipes: YAML files of nested settings, checked against the defaults, with overrides.

A recipe is a nested mapping. The *schema* is the defaults mapping itself: every key a recipe or an
override may set must exist in the defaults (the engine's :data:`ENGINE_DEFAULTS` merged with the
task's own ``defaults``), otherwise :class:`RecipeError` names the unknown key and lists the known ones.
A default of ``{}`` marks a free-form mapping (for example ``model.kwargs``, passed to the model).

Overrides are ``dotted.key=value`` strings; values are parsed as YAML (``5e-4``, ``[0.9, 0.999]``,
``null``, ``true`` all work)::

    cfg = resolve_recipe("pale_tiny_imagenet", ["epochs=100", "optim.lr_base=5e-4"], defaults)

Shipped recipes live in ``pale/recipes/<name>.yaml`` and are found by name; any other path is read as is.
"""
from __future__ import annotations

import copy
import difflib
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from ..errors import InputError

__all__ = ["RecipeError", "ENGINE_DEFAULTS", "ENGINE_RULES", "RecipeRule", "number_rule", "list_rule", "choice_rule",
           "check_rules", "check_optimizer_name", "is_number", "shipped_recipes", "recipe_path", "load_yaml", "merge", "parse_override",
           "apply_overrides", "resolve_recipe", "dump_recipe", "schedule_warnings", "ema_decay"]

Config = Dict[str, Any]
#: ``(dotted key, test of its value, what the value must be)``: see :func:`check_rules`
RecipeRule = Tuple[str, Callable[[Any], bool], str]


class RecipeError(InputError):
    """A recipe that cannot be used: unknown key, wrong type, missing file."""


# Settings of the generic engine (pale.train.trainer.Trainer). Tasks add their own sections.
ENGINE_DEFAULTS: Config = {
    "task": "classification",
    "epochs": 300,
    "batch_size": 1024,          # total over all devices and accumulation steps
    "seed": 0,
    "optim": {
        "opt": "adamw",
        "lr": None,              # absolute; when null, lr_base * batch_size / lr_base_size
        "lr_base": 1.0e-3,
        "lr_base_size": 1024,
        "weight_decay": 0.05,    # timm: none on 1-D params (norms, biases) and model.no_weight_decay()
        "betas": [0.9, 0.999],
        "eps": 1.0e-8,
        "momentum": 0.9,         # SGD-like optimizers only
        "layer_decay": None,
    },
    "sched": {
        "sched": "cosine",
        "warmup_epochs": 20,
        "warmup_lr": 1.0e-6,
        "min_lr": 1.0e-5,
        "cooldown_epochs": 0,
        "decay_rate": 0.1,       # step / poly power
        "decay_milestones": [],  # multistep: epochs at which the lr is multiplied by decay_rate
        "warmup_updates": None,  # warm-up in optimizer updates (mmseg/mmdet style); overrides warmup_epochs
        "step_on_epochs": False,  # False: update the lr after every optimizer step
    },
    "ema": {
        "enabled": True,
        "decay": 0.9998,         # upper bound; see max_window
        "warmup": False,         # timm ModelEmaV3 warm-up: decay 1 - (1 + update)^(-2/3) until it reaches decay
        "max_window": 0.1,       # cap the decay so the EMA's time constant 1/(1 - decay) is at most this fraction of all updates
    },
    "train": {
        "device": "auto",        # auto | cpu | cuda | cuda:N
        "amp": "auto",           # auto (bf16 on CPUs with native bf16, else none; bf16/fp16 on CUDA) | bf16 | fp16 | none
        "val_amp": False,        # validate under the training autocast (true) or in fp32 (false, as pale eval)
        "channels_last": False,
        "compile": False,        # torch.compile the model for the training loop (validation stays eager)
        "tf32": True,            # on CUDA, fp32 matmuls (fp32 training, fp32 validation) in TF32; false: full fp32
        # auto: the fixed rule of pale.models.attention_kernels (by device, dtype, group length, training);
        # or flash | math | explicit (| efficient | cudnn on CUDA) for every call
        "attention_kernel": "auto",
        "sync_bn": False,        # SyncBatchNorm across processes (the separable q/k/v projections use BN)
        "dist_bn": "reduce",     # reduce | broadcast | none: make BN running stats equal on all ranks each epoch
        "grad_checkpointing": False,
        "accum_steps": 1,
        "clip_grad": None,
        "clip_mode": "norm",     # norm | value | agc
        "workers": None,         # data loader processes per training process; null: from the cores (see loader_workers)
        "eval_every": 1,         # epochs between validations (the last epoch is always validated)
        "eval_batch_size": None,  # per device; default: twice the training batch per device
        "on_nonfinite": "stop",  # stop | skip: a NaN/inf loss stops the run, or its update is skipped
        "resume": None,          # auto: continue the run in the output folder if it has one, else start it
        "checkpoint_every_updates": 0,  # also save last.pth every N updates (0: at the end of each epoch only)
        "keep_checkpoints": 2,   # last.pth, last-1.pth, ...: a newest that does not load falls back to the one before
        "tensorboard": False,
        "progress": True,
    },
}


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bounds(lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool, integer: bool
            ) -> Tuple[Callable[[Any], bool], str, str]:
    """A test of one number against the bounds; what it is ("an integer"); the bounds (">= 1", "in [0, 1)")."""
    def ok(v: Any) -> bool:
        if not is_number(v) or (integer and float(v) != int(v)):
            return False
        return (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))

    if lo is not None and hi is not None:
        bounds = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        bounds = f"{'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        bounds = f"{'<' if hi_open else '<='} {hi:g}"
    else:
        bounds = ""
    return ok, "an integer" if integer else "a number", bounds


def number_rule(key: str, lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
                hi_open: bool = False, integer: bool = False, nullable: bool = False) -> RecipeRule:
    """``key`` holds one number within the bounds (open or closed), or null when ``nullable``."""
    ok, kind, bounds = _bounds(lo, hi, lo_open, hi_open, integer)
    what = f"{kind} {bounds}".strip()
    if nullable:
        return key, lambda v: v is None or ok(v), f"null or {what}"
    return key, ok, what


def list_rule(key: str, lo: Optional[float] = None, hi: Optional[float] = None, *, length: Optional[int] = None,
              order: str = "", lo_open: bool = False, hi_open: bool = False, integer: bool = False,
              nullable: bool = False, empty: bool = False) -> RecipeRule:
    """``key`` holds a list of numbers within the bounds: ``length`` of them if given, else any number
    (none only when ``empty``); ``order`` ``"increasing"`` (strictly) or ``"non-decreasing"``; or null
    when ``nullable``."""
    ok, kind, bounds = _bounds(lo, hi, lo_open, hi_open, integer)
    steps = {"": lambda a, b: True, "increasing": lambda a, b: a < b, "non-decreasing": lambda a, b: a <= b}[order]

    def test(v: Any) -> bool:
        if v is None:
            return nullable
        return (isinstance(v, (list, tuple)) and (length is None or len(v) == length) and (empty or len(v) > 0)
                and all(ok(x) for x in v) and all(steps(a, b) for a, b in zip(v, v[1:])))

    items = "numbers" if kind == "a number" else "integers"
    what = f"a list of {length} {items}" if length else f"a {'' if empty else 'non-empty '}list of {items}"
    what += f", each {bounds}" if bounds else ""
    what += f", in {order} order" if order else ""
    return key, test, ("null or " if nullable else "") + what


def choice_rule(key: str, choices: Sequence[Any], nullable: bool = False) -> RecipeRule:
    """``key`` holds one of ``choices`` (or null when ``nullable``)."""
    names = ", ".join(str(c) for c in choices)
    return key, lambda v: (v is None and nullable) or v in choices, \
        ("null or " if nullable else "") + f"one of {names}"


def check_rules(cfg: Mapping[str, Any], rules: Iterable[RecipeRule]) -> None:
    """Refuse the first value that breaks its rule, naming the key, what it must be and what it is.
    Keys absent from ``cfg`` (another task's sections) are skipped."""
    for key, ok, what in rules:
        node: Any = cfg
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            if not ok(node):
                raise RecipeError(f"{key} must be {what}, got {node!r}")


def check_optimizer_name(opt: Any) -> None:
    """Refuse an ``optim.opt`` that timm's ``create_optimizer_v2`` does not know, with close names."""
    from timm.optim import list_optimizers

    known = list_optimizers()
    parts = str(opt).lower().split("_")  # timm reads "lookahead_<name>" as <name> inside Lookahead
    if parts[-1] not in known or (len(parts) > 1 and parts[:-1] != ["lookahead"]):
        close = difflib.get_close_matches(parts[-1], known, n=3)
        raise RecipeError(f"optim.opt {opt!r} is not a timm optimizer"
                          f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; "
                          f"e.g. adamw, sgd, lamb, or lookahead_adamw; all: timm.optim.list_optimizers()")


#: Values the engine's settings must have (types come from :data:`ENGINE_DEFAULTS`; these are ranges).
ENGINE_RULES: Tuple[RecipeRule, ...] = (
    number_rule("epochs", 1, integer=True),
    number_rule("batch_size", 1, integer=True),
    number_rule("optim.lr", 0, lo_open=True, nullable=True),
    number_rule("optim.lr_base", 0, lo_open=True),
    number_rule("optim.lr_base_size", 0, lo_open=True),
    number_rule("optim.weight_decay", 0, nullable=True),
    list_rule("optim.betas", 0, 1, length=2, hi_open=True),
    number_rule("optim.eps", 0, lo_open=True),
    number_rule("optim.momentum", 0, 1),
    number_rule("optim.layer_decay", 0, 1, lo_open=True, nullable=True),
    number_rule("sched.warmup_epochs", 0),
    number_rule("sched.warmup_updates", 0, integer=True, nullable=True),
    number_rule("sched.warmup_lr", 0),
    number_rule("sched.min_lr", 0),
    number_rule("sched.cooldown_epochs", 0, integer=True),
    number_rule("sched.decay_rate", 0, lo_open=True),
    list_rule("sched.decay_milestones", 0, order="increasing", empty=True),
    # none: a constant lr. plateau is left out: the engine steps schedulers by epoch or update, never
    # with a metric
    choice_rule("sched.sched", ("cosine", "tanh", "step", "multistep", "poly", "none")),
    number_rule("ema.decay", 0, 1, hi_open=True),
    number_rule("ema.max_window", 0, 1, lo_open=True, nullable=True),
    number_rule("train.accum_steps", 1, integer=True),
    number_rule("train.eval_every", 1, integer=True),
    number_rule("train.eval_batch_size", 1, integer=True, nullable=True),
    number_rule("train.clip_grad", 0, lo_open=True, nullable=True),
    choice_rule("train.clip_mode", ("norm", "value", "agc")),
    choice_rule("train.on_nonfinite", ("stop", "skip")),
    choice_rule("train.dist_bn", ("reduce", "broadcast", "none")),
    number_rule("train.checkpoint_every_updates", 0, integer=True),
    number_rule("train.keep_checkpoints", 1, integer=True),
)


def shipped_recipes() -> List[str]:
    """Names of the recipes shipped in ``pale/recipes``."""
    folder = resources.files("pale") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_path(name_or_path: Union[str, Path]) -> Path:
    """A shipped recipe's file (by name, with or without ``.yaml``) or an existing file path."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    shipped = resources.files("pale") / "recipes" / f"{stem}.yaml"
    if str(name_or_path) == p.name and shipped.is_file():
        return Path(str(shipped))
    raise RecipeError(f"recipe not found: {name_or_path} (not a file, and not one of the shipped recipes: "
                      f"{', '.join(shipped_recipes())})")


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` and ``5E-4`` as numbers (YAML 1.2) rather than strings.

    PyYAML follows YAML 1.1, whose floats need a dot (``1.0e-3``), so ``--set optim.lr=1e-3`` or
    ``lr: 1e-3`` in a recipe would be the string ``'1e-3'`` and be refused as not a number.
    """


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),  # the exponent forms without a dot
    list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    """``text`` as YAML, through :class:`RecipeLoader`."""
    return yaml.load(text, Loader=RecipeLoader)


def load_yaml(path: Union[str, Path]) -> Config:
    p = recipe_path(path)
    try:
        data = parse_yaml(p.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {p} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {p} must be a mapping of settings, got {type(data).__name__}")
    return data


def _coerce(key: str, default: Any, value: Any) -> Any:
    """Check ``value`` against the default's type; numbers given as strings (YAML reads ``5e-4`` as
    a string) are converted."""
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"recipe key '{key}' must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise RecipeError(f"recipe key '{key}' must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"recipe key '{key}' must be a number, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            if not value.is_integer():
                raise RecipeError(f"recipe key '{key}' must be an integer, got {value!r}")
            value = int(value)
        return value
    if isinstance(default, str) and not isinstance(value, str):
        raise RecipeError(f"recipe key '{key}' must be a string, got {value!r}")
    if isinstance(default, list) and not isinstance(value, (list, tuple)):
        raise RecipeError(f"recipe key '{key}' must be a list, got {value!r}")
    return value


def _unknown(key: str, known: Iterable[str]) -> RecipeError:
    known = sorted(known)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return RecipeError(f"unknown recipe key '{key}'{hint}; known keys here: {', '.join(known)}")


def merge(base: Mapping[str, Any], update: Mapping[str, Any], prefix: str = "") -> Config:
    """``base`` updated by ``update``, recursively; every key of ``update`` must exist in ``base``
    unless ``base`` is an empty (free-form) mapping."""
    out = copy.deepcopy(dict(base))
    free_form = len(base) == 0
    for key, value in update.items():
        if not isinstance(key, str):
            raise RecipeError(f"recipe keys must be strings, got {key!r} under '{prefix or '(top)'}'")
        dotted = f"{prefix}{key}"
        if key not in base:
            if free_form:
                out[key] = copy.deepcopy(value)
                continue
            raise _unknown(dotted, base.keys())
        default = base[key]
        if isinstance(default, dict):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise RecipeError(f"recipe key '{dotted}' must be a mapping, got {value!r}")
            out[key] = merge(default, value, dotted + ".")
        else:
            out[key] = copy.deepcopy(_coerce(dotted, default, value))
    return out


def parse_override(text: str) -> Config:
    """``"a.b=1"`` -> ``{"a": {"b": 1}}`` (the value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like key=value (e.g. optim.lr_base=5e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r} has an empty key")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    out: Config = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _update(base: Mapping[str, Any], update: Mapping[str, Any]) -> Config:
    """``base`` with ``update``'s entries, mappings merged recursively (no checks)."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(cfg: Mapping[str, Any], overrides: Optional[Iterable[str]], defaults: Mapping[str, Any]) -> Config:
    """``cfg`` with each ``key=value`` override applied, every step checked against ``defaults`` (so a
    free-form section such as ``model.kwargs`` takes new keys even when the recipe already sets some)."""
    out = merge(defaults, cfg)
    for text in overrides or ():
        out = merge(defaults, _update(out, parse_override(text)))
    return out


def resolve_recipe(recipe: Union[str, Path, Mapping[str, Any], None], overrides: Optional[Iterable[str]],
                   defaults: Mapping[str, Any]) -> Config:
    """Defaults, then the recipe (a name, a path or a mapping), then the overrides, all checked."""
    data = load_yaml(recipe) if isinstance(recipe, (str, Path)) else dict(recipe or {})
    return apply_overrides(merge(defaults, data), overrides, defaults)


def dump_recipe(cfg: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=False)


def ema_decay(ema: Mapping[str, Any], total_updates: int) -> float:
    """The EMA decay of a run of ``total_updates`` optimizer updates: ``ema.decay``, capped so the
    EMA's time constant ``1 / (1 - decay)`` spans at most ``ema.max_window`` of the run.

    The paper-scale ImageNet run (375k updates) keeps 0.9998 (cap 0.99997); a 60-update fine-tune gets
    1 - 1/6 = 0.83 instead of an average that still holds its initialisation.
    """
    decay = float(ema["decay"])
    window = ema.get("max_window")
    if window is None:
        return decay
    span = float(window) * max(int(total_updates), 1)
    return max(0.0, min(decay, 1.0 - 1.0 / span)) if span > 1.0 else 0.0


def schedule_warnings(cfg: Mapping[str, Any], updates_per_epoch: int, num_samples: int, workers: int,
                      cores: int) -> List[str]:
    """Ways the recipe's schedule does not fit the data or the machine, one sentence each."""
    out: List[str] = []
    epochs = int(cfg["epochs"])
    total = epochs * updates_per_epoch
    s = cfg["sched"]
    in_updates = s.get("warmup_updates") is not None
    warmup = float(s["warmup_updates"]) if in_updates else float(s["warmup_epochs"]) * updates_per_epoch
    if warmup > total / 2:
        key = "sched.warmup_updates" if in_updates else "sched.warmup_epochs"
        shorter = load_yaml(recipe_path("small_data"))["sched"]["warmup_epochs"]  # suggested where it helps
        hint = ", or try --recipe small_data" if cfg.get("task") == "classification" and not in_updates \
            and float(s["warmup_epochs"]) > float(shorter) else ""
        out.append(f"the warm-up ({warmup:.0f} updates) is longer than half the run ({total} updates: {epochs} "
                   f"epoch(s) x {updates_per_epoch} for {num_samples} images); lower {key}{hint}")
    if workers > cores:
        out.append(f"{workers} data loader processes for {cores} CPU core(s) compete with training "
                   f"(train.workers; null picks from the cores)")
    return out
