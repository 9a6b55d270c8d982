"""Scaled dot-product attention through the kernel that measured fastest for the call's shape class.

No single attention kernel is fastest everywhere. On CPUs PyTorch's flash kernel is the fastest
choice for Pale-T's long stage-1 groups in float32, but under bf16 autocast the explicit
``softmax(q k^T / sqrt(d)) v`` (two GEMMs and a softmax) runs several times faster at the short
sequences of stages 2-4. So :func:`attention` times the candidates once, at the first call of each
:class:`KernelKey` (device type, dtype, shape class, masked or not, training or inference), keeps the
fastest for the rest of the process, and runs it.

Candidates (:data:`CANDIDATES`):
  * ``flash``: on the CPU, ``F.scaled_dot_product_attention``'s default dispatch, which on the CPU
    runs its flash kernel; on CUDA, SDPA restricted to the flash backend;
  * ``efficient``, ``cudnn`` (CUDA only): SDPA restricted to that backend;
  * ``math``: SDPA restricted to its math backend;
  * ``explicit``: :func:`explicit_attention`, refused when its score tensor would exceed the memory
    cap (:func:`set_memory_cap`, ``PALE_ATTN_MEMORY_CAP_MB``, default 512 MiB).

Timing: forward (and backward of all three inputs when the call records gradients) on detached
copies of the call's inputs; one warm-up per candidate, then three rounds that run every candidate
once in turn (so that load from other processes falls on all alike), best time per candidate. A
candidate that raises (a backend that does not take these inputs) is left out.

Shape class: ``(batch * groups, heads, length, head_dim)`` with the first and the length rounded up
to a power of two, heads and head dim exact. One measurement serves the shapes of a class (the
several padded sizes of detection inputs, say), and the memory cap is checked per call on the
call's exact shape.

Control:
  * ``PALE_ATTN_KERNEL=auto|flash|math|explicit|...`` (read at import) or :func:`set_kernel` /
    :func:`use_kernel` force one kernel for every call (a forced kernel bypasses the memory cap);
  * ``PALE_ATTN_CACHE=path.json`` keeps the measurements on disk, under an entry per machine
    (CPU model, instruction set, cores, torch threads, GPU name) and torch version, so later
    processes on the same machine skip the timing;
  * :func:`kernel_choices` / :func:`load_kernel_choices` save and restore the measurements, so that a
    resumed training run uses the kernels of the run it continues (different kernels round
    differently, so only the same kernels continue bit-exactly).

Under tracing and compilation (``torch.jit`` tracing and scripting, ``torch.compile`` / dynamo /
``torch.export``, ``torch.fx`` symbolic tracing, ONNX export) and under dispatch modes such as
``FlopCounterMode`` or fake tensors, nothing is timed: the call is the plain
``F.scaled_dot_product_attention`` (or :func:`explicit_attention` when forced), fixed in the graph.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["ALL_KERNELS", "CANDIDATES", "KernelKey", "attention", "attention_probs", "explicit_attention", "select_kernel", "kernel_key",
           "set_kernel", "get_kernel", "use_kernel", "set_memory_cap", "kernel_choices",
           "load_kernel_choices", "clear_kernel_choices", "recording", "measure_seconds", "hardware_id",
           "cpu_model_name"]

KernelFn = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]

#: Candidate kernels per device type, in the order they are timed.
CANDIDATES: Dict[str, Tuple[str, ...]] = {
    "cpu": ("flash", "math", "explicit"),
    "cuda": ("flash", "efficient", "cudnn", "math", "explicit"),
}
KERNEL_ENV, CACHE_ENV, CAP_ENV = "PALE_ATTN_KERNEL", "PALE_ATTN_CACHE", "PALE_ATTN_MEMORY_CAP_MB"
DEFAULT_MEMORY_CAP_MB = 512
_CHOICES_FORMAT = 1


# --------------------------------------------------------------------------------------------
# The kernels
# --------------------------------------------------------------------------------------------

def attention_probs(q: Tensor, k: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
    """The attention weights ``softmax(q k^T / sqrt(d) masked)``: ``(N, heads, L, L)``.

    Args:
        q, k: ``(N, heads, L, D)``.
        key_mask: bool, broadcastable to ``(N, heads, L, L)``; ``True`` where a key may be attended to.
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if key_mask is not None:
        # In place on the matmul's output, which its backward does not need: one L x L tensor, not two.
        scores = scores.masked_fill_(~key_mask, float("-inf"))
    return scores.softmax(-1)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
    """``softmax(q k^T / sqrt(d) masked) v`` with plain matmuls (:func:`attention_probs` times ``v``).

    Args:
        q, k, v: ``(N, heads, L, D)``.
        key_mask: as for :func:`attention_probs`.
    Returns:
        ``(N, heads, L, D)``.
    """
    return attention_probs(q, k, key_mask) @ v


def _sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


def _sdpa_backend(backend: SDPBackend) -> KernelFn:
    def run(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    return run


# The CPU has two SDPA backends, flash and math, and its default dispatch takes flash for every input
# flash accepts; calling it directly saves sdpa_kernel's ~0.1 ms of Python per call.
_KERNELS: Dict[str, Dict[str, KernelFn]] = {
    "cpu": {"flash": _sdpa, "math": _sdpa_backend(SDPBackend.MATH), "explicit": explicit_attention},
    "cuda": {"flash": _sdpa_backend(SDPBackend.FLASH_ATTENTION),
             "efficient": _sdpa_backend(SDPBackend.EFFICIENT_ATTENTION),
             "cudnn": _sdpa_backend(SDPBackend.CUDNN_ATTENTION),
             "math": _sdpa_backend(SDPBackend.MATH), "explicit": explicit_attention},
}
#: Every kernel name of every device type.
ALL_KERNELS: Tuple[str, ...] = tuple(dict.fromkeys(n for names in CANDIDATES.values() for n in names))


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


class KernelKey(NamedTuple):
    """What a kernel choice depends on: device type, dtype, shape class, masking and training.

    ``batch`` and ``length`` are rounded up to powers of two; ``heads`` and ``head_dim`` are exact.
    (A named tuple: it is built on every call, and a frozen dataclass costs ten times more.)
    """

    device: str
    dtype: str
    batch: int
    heads: int
    length: int
    head_dim: int
    masked: bool
    train: bool

    def __str__(self) -> str:
        return (f"{self.device}/{self.dtype}/n{self.batch}/h{self.heads}/l{self.length}/d{self.head_dim}/"
                f"{'mask' if self.masked else 'nomask'}/{'train' if self.train else 'infer'}")

    @classmethod
    def parse(cls, text: str) -> "KernelKey":
        try:
            device, dtype, n, h, length, d, mask, mode = text.split("/")
            if mask not in ("mask", "nomask") or mode not in ("train", "infer"):
                raise ValueError
            return cls(device, dtype, int(n[1:]), int(h[1:]), int(length[1:]), int(d[1:]), mask == "mask",
                       mode == "train")
        except ValueError:
            raise ValueError(f"not an attention kernel key: {text!r} "
                             f"(expected device/dtype/nN/hH/lL/dD/mask|nomask/train|infer)") from None


def kernel_key(q: Tensor, masked: bool, train: bool) -> KernelKey:
    """The :class:`KernelKey` of a call with queries ``q`` of shape ``(N, heads, L, D)``."""
    n, heads, length, head_dim = q.shape
    return KernelKey(q.device.type, _DTYPE_NAMES.get(q.dtype) or str(q.dtype).replace("torch.", ""),
                     _next_pow2(n), heads, _next_pow2(length), head_dim, masked, train)


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------

@dataclass
class _Measurement:
    shape: Tuple[int, int, int, int]   # the exact (N, heads, L, D) that was timed
    times_s: Dict[str, float]          # best time per usable candidate


def _kernel_from_env() -> str:
    name = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if name != "auto" and name not in ALL_KERNELS:
        raise ValueError(f"{KERNEL_ENV}={name!r} is not one of auto, {', '.join(ALL_KERNELS)}")
    return name


def _cap_from_env() -> int:
    text = os.environ.get(CAP_ENV, str(DEFAULT_MEMORY_CAP_MB))
    try:
        mib = float(text)
    except ValueError:
        raise ValueError(f"{CAP_ENV}={text!r} is not a number of MiB") from None
    if mib < 0:
        raise ValueError(f"{CAP_ENV} must be >= 0, got {text!r}")
    return int(mib * 2 ** 20)


class _State:
    def __init__(self) -> None:
        # Not validated here: a bad value is reported by the first call, as a clear error, rather
        # than as a traceback from `import pale`.
        self.kernel = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
        self.memory_cap: Optional[int] = None  # bytes; None: from the environment at first use
        self.choices: Dict[KernelKey, _Measurement] = {}
        self.disk_loaded_from: Optional[str] = None
        self.lock = threading.Lock()
        self.records: Optional[List[Tuple[KernelKey, Tuple[int, ...], str]]] = None


_state = _State()


def set_kernel(name: Optional[str]) -> None:
    """Force ``name`` (one of :data:`CANDIDATES` or ``'auto'``) for every call; ``None`` re-reads
    ``PALE_ATTN_KERNEL``."""
    if name is None:
        _state.kernel = _kernel_from_env()
        return
    if name != "auto" and name not in ALL_KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; expected auto or one of {', '.join(ALL_KERNELS)}")
    _state.kernel = name


def get_kernel() -> str:
    """The forced kernel, or ``'auto'``."""
    return _state.kernel


@contextlib.contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Force ``name`` inside the ``with`` block (``'auto'`` to measure)."""
    previous = _state.kernel
    set_kernel(name)
    try:
        yield
    finally:
        _state.kernel = previous


def set_memory_cap(num_bytes: Optional[int]) -> None:
    """Refuse the explicit kernel when its ``N x heads x L x L`` score tensor would exceed ``num_bytes``;
    ``None`` re-reads ``PALE_ATTN_MEMORY_CAP_MB``."""
    if num_bytes is None:
        _state.memory_cap = _cap_from_env()
    elif num_bytes < 0:
        raise ValueError(f"memory cap must be >= 0 bytes, got {num_bytes}")
    else:
        _state.memory_cap = int(num_bytes)


def _memory_cap() -> int:
    if _state.memory_cap is None:
        _state.memory_cap = _cap_from_env()
    return _state.memory_cap


def clear_kernel_choices() -> None:
    """Forget every measurement of this process (the disk cache, if any, is read again when needed)."""
    with _state.lock:
        _state.choices.clear()
        _state.disk_loaded_from = None


# --------------------------------------------------------------------------------------------
# Saving and restoring the choices
# --------------------------------------------------------------------------------------------

def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512-BF16 or AMX), as oneDNN sees it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_model_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def hardware_id() -> str:
    """The machine and software a measurement holds for: CPU model, instruction set, cores, torch
    threads, GPU name (when CUDA is available) and torch version."""
    parts = [cpu_model_name(), torch.backends.cpu.get_cpu_capability(), f"{os.cpu_count()} cores",
             f"{torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    parts.append(f"torch {torch.__version__}")
    return " | ".join(parts)


def _entries(choices: Mapping[KernelKey, _Measurement]) -> Dict[str, Dict[str, object]]:
    return {str(key): {"shape": list(m.shape), "times_s": dict(m.times_s)} for key, m in choices.items()}


def kernel_choices() -> Dict[str, object]:
    """This process's measurements, as plain data for a checkpoint (JSON- and ``weights_only``-safe)."""
    with _state.lock:
        return {"format": _CHOICES_FORMAT, "hardware": hardware_id(), "choices": _entries(_state.choices)}


def _parse_entries(entries: Mapping[str, object], source: str) -> Dict[KernelKey, _Measurement]:
    parsed = {}
    for text, entry in entries.items():
        try:
            shape = tuple(int(s) for s in entry["shape"])  # type: ignore[index]
            times = {str(n): float(t) for n, t in entry["times_s"].items()}  # type: ignore[index]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"{source}: attention kernel entry {text!r} needs 'shape' (4 ints) and "
                             f"'times_s' (kernel -> seconds), got {entry!r}") from None
        unknown = set(times) - set(ALL_KERNELS)
        if len(shape) != 4 or unknown:
            raise ValueError(f"{source}: attention kernel entry {text!r} has shape {shape} or unknown kernels "
                             f"{sorted(unknown)}")
        parsed[KernelKey.parse(text)] = _Measurement(shape, times)  # type: ignore[arg-type]
    return parsed


def load_kernel_choices(state: Mapping[str, object]) -> None:
    """Restore measurements saved by :func:`kernel_choices` (they replace this process's for the
    same keys), whatever machine took them: a resumed run keeps the kernels it ran with."""
    if not isinstance(state, Mapping) or state.get("format") != _CHOICES_FORMAT or \
            not isinstance(state.get("choices"), Mapping):
        raise ValueError(f"not saved attention kernel choices (expected format {_CHOICES_FORMAT} from "
                         f"kernel_choices()), got {str(state)[:200]}")
    parsed = _parse_entries(state["choices"], "load_kernel_choices")  # type: ignore[arg-type]
    with _state.lock:
        _state.choices.update(parsed)


def _load_disk_cache() -> None:
    """Merge this machine's measurements from ``PALE_ATTN_CACHE`` once per path (caller holds the lock)."""
    path = os.environ.get(CACHE_ENV)
    if not path or _state.disk_loaded_from == path:
        return
    _state.disk_loaded_from = path
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{CACHE_ENV}={path}: cannot read the attention kernel cache ({err})") from None
    entries = doc.get(hardware_id(), {}) if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"{CACHE_ENV}={path} is not an attention kernel cache (a JSON object of machines)")
    for key, m in _parse_entries(entries, path).items():
        _state.choices.setdefault(key, m)


def _save_disk_cache() -> None:
    """Write this machine's measurements into ``PALE_ATTN_CACHE``, keeping other machines' (caller holds the lock)."""
    path = os.environ.get(CACHE_ENV)
    if not path:
        return
    from ..files import atomic_write_json

    doc: Dict[str, object] = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError):
            doc = {}
    if not isinstance(doc, dict):
        doc = {}
    mine = dict(doc.get(hardware_id()) or {})
    mine.update(_entries(_state.choices))
    doc[hardware_id()] = mine
    atomic_write_json(path, doc)


# --------------------------------------------------------------------------------------------
# Measuring and choosing
# --------------------------------------------------------------------------------------------

def measure_seconds(runs: Mapping[str, Callable[[], None]], repeats: int = 3) -> Dict[str, float]:
    """Best wall time of each callable over ``repeats`` rounds; a round calls each once, in turn, so
    that load from other processes falls on all of them alike (the caller has warmed them up)."""
    best = {name: math.inf for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _score_bytes(q: Tensor, k: Tensor) -> int:
    n, heads, length, _ = q.shape
    return n * heads * length * k.shape[-2] * q.element_size()


def _timed_run(fn: KernelFn, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
               train: bool) -> Callable[[], None]:
    q, k, v = (t.detach().clone().requires_grad_(train) for t in (q, k, v))
    sync = torch.cuda.synchronize if q.device.type == "cuda" else (lambda: None)

    def run() -> None:
        out = fn(q, k, v, key_mask)
        if train:
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        sync()
    return run


def _measure(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], train: bool) -> _Measurement:
    too_big = _score_bytes(q, k) > _memory_cap()
    # Identity saved-tensor hooks: inside a non-reentrant checkpoint, the timing's own graph must not
    # be routed through the checkpoint's hooks (they would recompute the segment on unpack).
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.set_grad_enabled(train):
        runs = {}
        for name in CANDIDATES[q.device.type]:
            if name == "explicit" and too_big:
                continue
            run = _timed_run(_KERNELS[q.device.type][name], q, k, v, key_mask, train)
            try:
                run()  # warm-up, and whether the backend takes these inputs at all
            except RuntimeError:
                continue
            runs[name] = run
        times = measure_seconds(runs)
    return _Measurement(tuple(q.shape), times)  # type: ignore[arg-type]


def select_kernel(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> str:
    """The kernel :func:`attention` runs for these inputs, measuring the candidates on a new key."""
    train = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    key = kernel_key(q, key_mask is not None, train)
    choice = _state.kernel if _state.kernel != "auto" else _fastest(key, q, k, v, key_mask)
    if choice not in CANDIDATES.get(key.device, ()):
        raise ValueError(f"attention kernel {choice!r} (from set_kernel or {KERNEL_ENV}) is not available on "
                         f"{key.device}; expected auto or one of {', '.join(CANDIDATES.get(key.device, ()))}")
    if _state.records is not None:
        _state.records.append((key, tuple(q.shape), choice))
    return choice


def _fastest(key: KernelKey, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> str:
    """The fastest measured kernel of ``key`` that the memory cap allows for this call."""
    measured = _state.choices.get(key)
    if measured is None:
        with _state.lock:
            _load_disk_cache()
            measured = _state.choices.get(key)
            if measured is None:
                measured = _state.choices[key] = _measure(q, k, v, key_mask, key.train)
                _save_disk_cache()
    fits = _score_bytes(q, k) <= _memory_cap()
    usable = [n for n in CANDIDATES[key.device] if n in measured.times_s and (fits or n != "explicit")]
    return min(usable, key=measured.times_s.__getitem__) if usable else "math"  # math takes any input


@contextlib.contextmanager
def recording() -> Iterator[List[Tuple[KernelKey, Tuple[int, ...], str]]]:
    """Record ``(key, exact q shape, kernel)`` of every measured-path call inside the block, in order."""
    previous, _state.records = _state.records, []
    try:
        yield _state.records
    finally:
        _state.records = previous


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

def _fixed_path(q: Tensor) -> bool:
    """Whether this call is being traced, compiled or run under a dispatch mode: no timing then."""
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    if isinstance(q, torch.fx.Proxy) or type(q) is not Tensor:
        return True
    # ONNX export is covered: the TorchScript exporter traces (is_tracing), the dynamo one compiles.
    return (q.device.type not in CANDIDATES or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._functorch.is_functorch_wrapped_tensor(q))


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
    """Scaled dot-product attention (scale ``1 / sqrt(D)``) through the measured-fastest kernel.

    Args:
        q, k, v: ``(N, heads, L, D)``.
        key_mask: bool, broadcastable to ``(N, heads, L, L)``; ``True`` where a key may be attended to.
    Returns:
        ``(N, heads, L, D)``.
    """
    if _fixed_path(q):
        return explicit_attention(q, k, v, key_mask) if _state.kernel == "explicit" else _sdpa(q, k, v, key_mask)
    return _KERNELS[q.device.type][select_kernel(q, k, v, key_mask)](q, k, v, key_mask)
