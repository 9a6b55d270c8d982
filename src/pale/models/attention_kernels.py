"""Scaled dot-product attention through a kernel picked by a fixed rule, :func:`choose_kernel`.

The rule is a pure function of the call, so every process and every DDP rank computes alike:

    device  dtype       mode       tokens per group L        kernel
    cpu     fp32, fp64  any        any                       flash (SDPA's default CPU dispatch)
    cpu     bf16, fp16  inference  L >= 256                  flash
    cpu     bf16, fp16  inference  L < 256                   explicit
    cpu     bf16, fp16  training   any                       explicit
    cpu     any         any        scores over the cap       flash, never explicit
    cuda    any         any        any                       sdpa (SDPA's own dispatch)

From Pale-T's stage shapes (224x224, batch 8) timed on a 2-core AVX-512 CPU with native bf16: in
bf16 the explicit ``softmax(q k^T / sqrt(d)) v`` beat flash 1.3-7.5x at L <= 196 and tied it in
training at L = 392, where flash was 1.5x faster at inference; in fp32 flash was faster or within
10%. Those calls were unmasked; a padding mask is not an input of the rule. The cap
(:func:`set_memory_cap`, ``PALE_ATTN_MEMORY_CAP_MB``, default 512 MiB) bounds the ``N x heads x L x L``
scores of explicit. ``benchmarks/kernel_choice.py`` re-derives the rule on other hardware (masked too).

Explicit runs on the CPU a chunk of groups at a time (:data:`CHUNK_BYTES` of scores), forward and
backward, so that the scores stay in cache: at Pale-T's stage-1 shape in fp32 (2-core AVX2 CPU) that
made it 2.4x faster in training and 3x at inference than the whole ``N x heads x L x L`` at once.

One override: ``PALE_ATTN_KERNEL`` (read at import), :func:`set_kernel` or :func:`use_kernel` (the
recipe key ``train.attention_kernel``) force ``flash``, ``math`` or ``explicit`` (and ``efficient``,
``cudnn`` on CUDA) for every call, cap or not. A forced SDPA backend has math as its fallback: on
CUDA flash takes neither fp32 nor an ``attn_mask``.

Under ``torch.compile`` the rule applies (it is static in dtype and shape). Where the call is
recorded rather than run (FX symbolic tracing, ``torch.jit``, ``torch.export``, dispatch modes such
as ``FlopCounterMode``) or on another device, it is plain ``F.scaled_dot_product_attention``, or
:func:`explicit_attention` when that is forced.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["ALL_KERNELS", "CANDIDATES", "attention", "attention_probs", "explicit_attention", "choose_kernel",
           "kernel_for", "is_exporting", "set_kernel", "get_kernel", "use_kernel", "set_memory_cap", "native_bf16"]

#: The kernels that can be forced, per device type.
CANDIDATES: Dict[str, Tuple[str, ...]] = {"cpu": ("flash", "math", "explicit"),
                                          "cuda": ("flash", "efficient", "cudnn", "math", "explicit")}
ALL_KERNELS: Tuple[str, ...] = CANDIDATES["cuda"]
KERNEL_ENV, CAP_ENV = "PALE_ATTN_KERNEL", "PALE_ATTN_MEMORY_CAP_MB"
DEFAULT_MEMORY_CAP_MB = 512
#: bf16/fp16 inference on the CPU: flash from this group length on (measured: explicit at 196, flash at 392).
FLASH_FROM_LENGTH = 256
#: The scores of one chunk of groups of :func:`explicit_attention` on the CPU: 2.5 MiB, within a core's L2
#: cache and a share of L3.
CHUNK_BYTES = 5 * 2 ** 19


def attention_probs(q: Tensor, k: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
    """The weights ``softmax(q k^T / sqrt(d) masked)``, ``(N, heads, L, L)``, of ``(N, heads, L, D)`` ``q``
    and ``k``; ``key_mask``: bool, broadcastable to the weights, ``True`` where a key may be attended to."""
    return _scaled_probs(q * q.shape[-1] ** -0.5, k, key_mask)


def _scaled_probs(q: Tensor, k: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """:func:`attention_probs` of an already scaled ``q``."""
    scores = q @ k.transpose(-2, -1)
    if key_mask is not None:
        # In place on the matmul's output, which its backward does not need: one L x L tensor, not two.
        scores = scores.masked_fill_(~key_mask, float("-inf"))
    return scores.softmax(-1)


def chunk_groups(q: Tensor, k: Tensor) -> int:
    """How many groups :func:`explicit_attention` computes at a time on the CPU: as many as keep one
    chunk's ``groups x heads x L x L`` scores within :data:`CHUNK_BYTES` (at least one)."""
    _, heads, length, _ = q.shape
    return max(1, CHUNK_BYTES // max(1, heads * length * k.shape[-2] * q.element_size()))


def _chunks(q: Tensor, key_mask: Optional[Tensor], chunk: int) -> Iterator[Tuple[slice, Optional[Tensor]]]:
    """The groups of each chunk, and the key mask's rows for them (a mask of one row serves all)."""
    for start in range(0, q.shape[0], chunk):
        rows = slice(start, start + chunk)
        yield rows, key_mask if key_mask is None or key_mask.shape[0] == 1 else key_mask[rows]


def _chunked_forward(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], chunk: int,
                     keep: Optional[List[Tensor]] = None) -> Tensor:
    """``softmax(q k^T masked) v`` of a scaled ``q``, ``chunk`` groups at a time; each chunk's weights are
    appended to ``keep`` when it is given."""
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    for rows, mask in _chunks(q, key_mask, chunk):
        p = _scaled_probs(q[rows], k[rows], mask)
        torch.matmul(p, v[rows], out=out[rows])
        if keep is not None:
            keep.append(p)
    return out


class _ChunkedAttention(torch.autograd.Function):
    """:func:`_chunked_forward` with a backward that also runs a chunk at a time: ``dv = p^T g``,
    ``ds = softmax'(g v^T)``, ``dq = ds k``, ``dk = ds^T q`` on one chunk's weights (saved per chunk)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], chunk: int) -> Tensor:
        probs: List[Tensor] = []
        out = _chunked_forward(q, k, v, key_mask, chunk, probs)
        ctx.chunk = chunk
        ctx.save_for_backward(q, k, v, *probs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        q, k, v, *probs = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for p, (rows, _) in zip(probs, _chunks(q, None, ctx.chunk)):
            g = grad[rows]
            torch.matmul(p.transpose(-2, -1), g, out=dv[rows])
            ds = torch._softmax_backward_data(g @ v[rows].transpose(-2, -1), p, -1, p.dtype)
            torch.matmul(ds, k[rows], out=dq[rows])
            torch.matmul(ds.transpose(-2, -1), q[rows], out=dk[rows])
        return dq, dk, dv, None, None


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
    """``softmax(q k^T / sqrt(d) masked) v`` with plain matmuls: ``(N, heads, L, D)`` in and out.

    On the CPU it runs :func:`chunk_groups` groups at a time, forward and backward, so that a chunk's
    scores stay in cache instead of making a round trip through memory for each of the matmul, the mask,
    the softmax and its backward; same sums per group. Under autocast ``q, k, v`` are cast to its dtype
    first, as its matmuls would. Graphs (traced, exported, compiled) and other devices record the whole
    expression at once.
    """
    if _graph_only(q) or q.device.type != "cpu" or torch.compiler.is_compiling():
        return attention_probs(q, k, key_mask) @ v
    if torch.is_autocast_enabled("cpu") and q.is_floating_point():
        dtype = torch.get_autocast_dtype("cpu")
        q, k, v = (t.to(dtype) for t in (q, k, v))
    with torch.autocast("cpu", enabled=False):
        q = q * q.shape[-1] ** -0.5
        chunk = chunk_groups(q, k)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _ChunkedAttention.apply(q, k, v, key_mask, chunk)
        return _chunked_forward(q, k, v, key_mask, chunk)


_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
# SDPA's own order puts cudnn after math, so the list's order must be the priority (torch >= 2.6 can say so).
_PRIORITY = {"set_priority": True} if "set_priority" in inspect.signature(sdpa_kernel).parameters else {}


def sdpa_backends(name: str) -> list:
    """The SDPA backends a forced ``name`` enables, in priority order: itself, then math, which takes
    any input and so runs only where ``name`` cannot."""
    return list(dict.fromkeys([_BACKENDS[name], SDPBackend.MATH]))


def _check_name(name: str, source: str) -> str:
    if name != "auto" and name not in ALL_KERNELS:
        raise ValueError(f"unknown attention kernel {name!r} ({source}); expected auto or one of {', '.join(ALL_KERNELS)}")
    return name


def _cap_from_env() -> int:
    text = os.environ.get(CAP_ENV, str(DEFAULT_MEMORY_CAP_MB))
    try:
        mib = float(text)
    except ValueError:
        mib = -1.0
    if not mib >= 0:  # NaN too
        raise ValueError(f"{CAP_ENV}={text!r} is not a number of MiB >= 0")
    return int(mib * 2 ** 20)


def _kernel_from_env() -> str:
    return os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"


# Not validated at import: a bad PALE_ATTN_KERNEL is reported by the first call, not as a traceback of `import pale`.
_kernel = _kernel_from_env()
_memory_cap: Optional[int] = None  # bytes; None: from the environment


def set_kernel(name: Optional[str]) -> None:
    """Force ``name`` (``'auto'``: the rule) for every call; ``None`` re-reads ``PALE_ATTN_KERNEL``."""
    global _kernel
    _kernel = _check_name(_kernel_from_env(), KERNEL_ENV) if name is None else _check_name(name, "set_kernel")


def get_kernel() -> str:
    """The forced kernel, or ``'auto'``."""
    return _kernel


@contextlib.contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Force ``name`` inside the ``with`` block (``'auto'``: the rule)."""
    global _kernel
    previous = _kernel
    set_kernel(name)
    try:
        yield
    finally:
        _kernel = previous


def set_memory_cap(num_bytes: Optional[int]) -> None:
    """Refuse the explicit kernel when its score tensor would exceed ``num_bytes``; ``None`` re-reads
    ``PALE_ATTN_MEMORY_CAP_MB``."""
    global _memory_cap
    if num_bytes is not None and num_bytes < 0:
        raise ValueError(f"memory cap must be >= 0 bytes, got {num_bytes}")
    _memory_cap = _cap_from_env() if num_bytes is None else int(num_bytes)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512-BF16 or AMX), as oneDNN sees it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose_kernel(device: str, dtype: torch.dtype, length: int, train: bool, score_bytes: int,
                  memory_cap: int = DEFAULT_MEMORY_CAP_MB * 2 ** 20) -> str:
    """The rule of the module's table: ``'flash'``, ``'explicit'`` or ``'sdpa'`` (SDPA's own dispatch),
    for ``length`` tokens per group and an ``N x heads x L x L`` score tensor of ``score_bytes``."""
    if device != "cpu":
        return "sdpa"
    if dtype not in (torch.bfloat16, torch.float16) or score_bytes > memory_cap:
        return "flash"
    return "flash" if not train and length >= FLASH_FROM_LENGTH else "explicit"


def is_exporting() -> bool:
    """Whether ``torch.export`` (or the dynamo ONNX exporter) is recording this call; False under ``torch.compile``.

    Reads the flag that ``torch.export`` sets rather than calling ``torch.compiler.is_exporting()`` (or timm's
    ``is_exporting()``): before PyTorch 2.14 dynamo replaced that call by ``True`` under ``torch.compile`` too,
    which sent compiled models down their export-only paths. The flag itself dynamo reads as it is.
    """
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))


def _graph_only(q: Tensor) -> bool:
    """Whether the call is recorded (traced, exported, under a dispatch mode) or on another device."""
    if isinstance(q, torch.fx.Proxy) or type(q) is not Tensor or torch.jit.is_scripting() or torch.jit.is_tracing() \
            or is_exporting():
        return True
    dispatch_mode = not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() > 0
    return dispatch_mode or q.device.type not in CANDIDATES


def kernel_for(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> str:
    """The kernel :func:`attention` runs for these inputs (a name of :data:`CANDIDATES`, or ``'sdpa'``)."""
    forced = _check_name(_kernel, f"set_kernel or {KERNEL_ENV}")
    if _graph_only(q):
        return "explicit" if forced == "explicit" else "sdpa"
    device = q.device.type
    if forced != "auto":
        if forced not in CANDIDATES[device]:
            raise ValueError(f"attention kernel {forced!r} is not available on {device}; "
                             f"expected auto or one of {', '.join(CANDIDATES[device])}")
        return forced
    n, heads, length, _ = q.shape
    train = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return choose_kernel(device, q.dtype, length, train, n * heads * length * k.shape[-2] * q.element_size(),
                         _cap_from_env() if _memory_cap is None else _memory_cap)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
    """Scaled dot-product attention (scale ``1 / sqrt(D)``) through :func:`kernel_for`'s kernel:
    ``(N, heads, L, D)`` in and out; ``key_mask`` as for :func:`attention_probs`."""
    name = kernel_for(q, k, v, key_mask)
    if name == "explicit":
        return explicit_attention(q, k, v, key_mask)
    # The CPU's default dispatch runs flash wherever flash runs (math elsewhere), without sdpa_kernel's Python.
    if name == "sdpa" or (name == "flash" and q.device.type == "cpu"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    with sdpa_kernel(sdpa_backends(name), **_PRIORITY):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
