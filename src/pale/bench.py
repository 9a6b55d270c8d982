"""Speed and memory of Pale models next to timm peers, measured in one process.

What ``pale bench`` measures, per model, input size, batch size, dtype, compile and gradient
checkpointing setting:

* **inference**: images/s and the median latency of one batch, in ``eval`` mode under
  ``torch.inference_mode``;
* **training step**: images/s of forward, cross-entropy, backward and one fused AdamW step (as
  ``pale train`` runs it);
* **achieved GFLOP/s**: ``2 x`` the measured multiply-adds of one forward
  (:func:`pale.complexity.measure_cost`: FlopCounterMode with SDPA's math backend, on the ``meta``
  device) times images/s, and its fraction of the machine's measured matmul peak;
* **peak memory**: over a freshly built model, in a separate process per model and mode, for one
  warm-up and one timed pass: on CUDA the growth of ``torch.cuda.max_memory_allocated``; on the CPU
  the growth of the resident set size (Linux ``VmHWM``, reset after the model is built). CPU tensors
  come from ``malloc``, which tracemalloc cannot see; the RSS high-water mark sees everything,
  including what the allocator keeps, so it is an upper bound on what the tensors need.

Everything runs on one device (``device``: ``cpu`` or ``cuda``): the model and its inputs, autocast
(bf16) with that device type, and on CUDA every timed pass ends with ``torch.cuda.synchronize`` so
that the clock sees the GPU's work, not only its queueing.

Timing is round-robin: after warm-up, every model (with and without gradient checkpointing, when
both are asked for) runs one pass in turn, ``repeats`` times, and each one's median is reported. A
machine shared with other work slows all models in a round alike, so the ratios are steadier than
the absolute numbers.

bf16 on a CPU without native bf16 instructions (no AVX-512-BF16 or AMX: oneDNN's check
``torch.ops.mkldnn._is_mkldnn_bf16_supported()``) runs through emulation; such results are marked
``emulated`` and are not bf16 speed (on CUDA: a GPU whose bf16 is emulated, such as a V100).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import InputError
from .models.attention_kernels import native_bf16

Pair = Tuple[int, int]
DTYPES = ("fp32", "bf16")
MODES = ("infer", "train")

#: timm peers and how to build them for a given input size.
PEERS: Dict[str, Callable[[Pair], Dict[str, Any]]] = {
    "swin_tiny_patch4_window7_224": lambda size: dict(img_size=size),
    "convnext_tiny": lambda size: {},
    "deit_small_patch16_224": lambda size: dict(img_size=size),
}


def check_model_name(name: str) -> None:
    """Refuse a name that is neither a timm model nor one of :data:`PEERS`."""
    import timm

    import pale  # noqa: F401  (registers the Pale models)

    if not timm.is_model(name) and name not in PEERS:
        raise InputError(f"unknown model {name!r}; try pale_tiny, pale_small, pale_base or one of {sorted(PEERS)}")


def create_model(name: str, img_size: Pair) -> nn.Module:
    """A randomly initialised model that takes ``(B, 3, *img_size)`` images."""
    import timm

    check_model_name(name)
    kwargs = PEERS[name](img_size) if name in PEERS else {}
    return timm.create_model(name, pretrained=False, **kwargs)


def forward_macs(name: str, img_size: Pair) -> int:
    """Multiply-adds of one forward of one image (FlopCounterMode, SDPA math backend, meta device)."""
    from .complexity import measure_cost

    model = create_model(name, img_size)
    try:
        return measure_cost(model.to("meta"), img_size).macs
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel: count on CPU
        return measure_cost(create_model(name, img_size), img_size).macs


# --------------------------------------------------------------------------------------------
# Machine peak
# --------------------------------------------------------------------------------------------

def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` where available, else ``cpu``; ``cuda`` without CUDA is refused."""
    if name not in ("auto", "cpu", "cuda"):
        raise InputError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda: CUDA is not available to this PyTorch (torch.cuda.is_available() is False)")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _grow_until(make: Callable[[int], Callable[[], Any]], sizes: Sequence[int], budget_s: float) -> Tuple[int, Callable[[], Any]]:
    """The largest size whose single call stays under ``budget_s`` (so that a slow dtype, such as
    bf16 on a CPU without native bf16 instructions, does not take minutes), and its callable."""
    chosen = None
    for size in sizes:
        fn = make(size)
        fn()
        start = time.perf_counter()
        fn()
        chosen = (size, fn)
        if time.perf_counter() - start > budget_s:
            break
    assert chosen is not None
    return chosen


@torch.inference_mode()
def matmul_peak(dtype: torch.dtype = torch.float32, repeats: int = 5, budget_s: float = 0.5, device: str = "cpu") -> float:
    """GFLOP/s of a square matrix product (``torch.mm``) in ``dtype``, ``n`` up to 2048 (8192 on CUDA)."""
    def make(n: int) -> Callable[[], Any]:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        return lambda: (torch.mm(a, b), _sync(device))

    n, fn = _grow_until(make, (256, 512, 1024, 2048) + ((4096, 8192) if device == "cuda" else ()), budget_s)
    return 2 * n ** 3 / _median_seconds(fn, repeats) / 1e9


@torch.inference_mode()
def conv_peak(dtype: torch.dtype = torch.float32, repeats: int = 5, budget_s: float = 0.5, device: str = "cpu") -> float:
    """GFLOP/s of a 1x1 convolution, ``c -> c`` channels on a channels-last 8x28x28 map, ``c`` up to 1024."""
    def make(c: int) -> Callable[[], Any]:
        x = torch.randn(8, c, 28, 28, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, c, 1, 1, device=device).to(dtype)
        return lambda: (torch.nn.functional.conv2d(x, w), _sync(device))

    c, fn = _grow_until(make, (128, 256, 512, 1024), budget_s)
    return 2 * 8 * 28 * 28 * c * c / _median_seconds(fn, repeats) / 1e9


def machine_peaks(repeats: int = 5, device: str = "cpu") -> Dict[str, float]:
    """Measured GFLOP/s on ``device``: fp32 and bf16 matmul, fp32 and bf16 1x1 convolution."""
    return {f"{op}_{name}": peak(dtype, repeats=repeats, device=device)
            for op, peak in (("matmul", matmul_peak), ("conv1x1", conv_peak))
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def cpu_model_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def bf16_emulated(device: str) -> bool:
    """Whether bf16 on ``device`` runs emulated: a CPU without native bf16, a GPU without bf16 units."""
    if device != "cuda":
        return not native_bf16()
    try:
        return not torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 counts no emulation
        return not torch.cuda.is_bf16_supported()


def machine_info(device: str = "cpu") -> Dict[str, Any]:
    """The device the models run on (its name), CPU model, instruction set, native bf16, cores, torch
    version and load average at the time of the run."""
    return {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_model_name(),
            "cpu": cpu_model_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(),
            "bf16_emulated": bf16_emulated(device), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "loadavg": list(os.getloadavg())}


# --------------------------------------------------------------------------------------------
# One model, one setting
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """What one measurement runs: a model at an input size, batch size, dtype, compiled or not, with
    gradient checkpointing or not (it only changes the training step), on a device (``cpu``, ``cuda``)."""

    model: str
    img_size: Pair
    batch_size: int
    dtype: str = "fp32"
    compile: bool = False
    grad_checkpointing: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise InputError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.batch_size < 1 or min(self.img_size) < 1:
            raise InputError(f"batch size and image size must be positive, got {self.batch_size}, {self.img_size}")


class Runner:
    """Builds the model of a :class:`Setting` on its device and runs one inference batch or one
    training step; on CUDA each call returns once the GPU has finished it."""

    def __init__(self, setting: Setting, mode: str, seed: int = 0):
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        torch.manual_seed(seed)
        self.setting, self.mode = setting, mode
        self.model = create_model(setting.model, setting.img_size).to(setting.device)
        self.model.train(mode == "train")
        if setting.grad_checkpointing:
            if not hasattr(self.model, "set_grad_checkpointing"):
                raise InputError(f"{setting.model} has no set_grad_checkpointing()")
            self.model.set_grad_checkpointing(True)
        self.forward = torch.compile(self.model) if setting.compile else self.model
        self.x = torch.randn(setting.batch_size, 3, *setting.img_size, device=setting.device)
        self.y = torch.randint(0, 1000, (setting.batch_size,), device=setting.device)
        # fused, as `pale train` builds it (pale.train.build.build_optimizer)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True) if mode == "train" else None
        self.autocast = dict(device_type=setting.device, dtype=torch.bfloat16, enabled=setting.dtype == "bf16")

    def __call__(self) -> None:
        if self.mode == "infer":
            with torch.inference_mode(), torch.autocast(**self.autocast):
                self.forward(self.x)
        else:
            with torch.autocast(**self.autocast):
                loss = nn.functional.cross_entropy(self.forward(self.x), self.y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        _sync(self.setting.device)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024  # kB


def peak_memory_mib(setting: Setting, mode: str) -> float:
    """Peak memory growth (MiB) over the built model during one warm-up and one timed pass (CUDA:
    allocated device memory; CPU: RSS), measured in a fresh process so that other models' memory does
    not hide it."""
    code = ("import json, sys; from pale.bench import _memory_probe; "
            "print(json.dumps(_memory_probe(json.loads(sys.argv[1]), sys.argv[2])))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(setting)), mode], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe of {setting.model} ({mode}) failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _memory_probe(setting: Dict[str, Any], mode: str) -> float:
    """CUDA: the peak of allocated memory over what the built model holds. Linux CPU: writing 5 to
    /proc/self/clear_refs resets the RSS high-water mark (VmHWM), so the peak of the passes is seen
    even when importing and building went higher."""
    setting["img_size"] = tuple(setting["img_size"])
    runner = Runner(Setting(**setting), mode)
    if runner.setting.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runner()
        runner()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mib("VmRSS")
    runner()
    runner()
    return _status_mib("VmHWM") - before


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

@dataclass
class Result:
    """Medians of one model in one setting; ``None`` where a mode was not measured."""

    model: str
    img_size: Pair
    batch_size: int
    dtype: str
    compile: bool
    gmacs_per_image: float
    grad_checkpointing: bool = False
    emulated: bool = False  # bf16 without native bf16 instructions: not bf16 speed
    device: str = "cpu"
    infer_images_per_s: Optional[float] = None
    infer_latency_ms: Optional[float] = None
    infer_gflops: Optional[float] = None
    infer_fraction_of_peak: Optional[float] = None
    train_images_per_s: Optional[float] = None
    train_gflops: Optional[float] = None
    infer_peak_mem_mib: Optional[float] = None
    train_peak_mem_mib: Optional[float] = None
    infer_times_s: List[float] = field(default_factory=list)
    train_times_s: List[float] = field(default_factory=list)


def run_benchmark(models: Sequence[str], img_sizes: Sequence[Pair], batch_sizes: Sequence[int],
                  dtypes: Sequence[str] = ("fp32",), compile_modes: Sequence[bool] = (False,),
                  modes: Sequence[str] = MODES, warmup: int = 2, repeats: int = 5, memory: bool = True,
                  peaks: Optional[Dict[str, float]] = None, checkpointing: Sequence[bool] = (False,),
                  log: Callable[[str], None] = lambda s: None, device: str = "cpu") -> List[Result]:
    """Measure every model in every setting on ``device``; the models of one setting are timed round-robin, and
    with ``checkpointing=(False, True)`` each model's training step with and without gradient
    checkpointing in the same rounds (inference is measured without it: it changes nothing there).

    Eager and compiled models (``compile_modes=(False, True)``) are timed in the same rounds too.

    Returns one :class:`Result` per (setting, model, compile, checkpointing), settings in the order
    size, batch, dtype.
    """
    results: List[Result] = []
    macs_cache: Dict[Tuple[str, Pair], int] = {}
    emulated_bf16 = bf16_emulated(device)
    for size in img_sizes:
        for model in models:
            if (model, size) not in macs_cache:
                macs_cache[(model, size)] = forward_macs(model, size)
        for batch in batch_sizes:
            for dtype in dtypes:
                settings = [Setting(m, size, batch, dtype, compiled, ckpt, device)
                            for m in models for compiled in compile_modes for ckpt in checkpointing]
                group = {s: Result(s.model, size, batch, dtype, s.compile, macs_cache[(s.model, size)] / 1e9,
                                   s.grad_checkpointing, emulated=dtype == "bf16" and emulated_bf16, device=device)
                         for s in settings}
                for mode in modes:
                    active = [s for s in settings if mode == "train" or s.grad_checkpointing == min(checkpointing)]
                    runners = []
                    for s in active:
                        log(f"building {s.model} on {device} ({mode}, {size[0]}x{size[1]}, batch {batch}, {dtype}"
                            f"{', compiled' if s.compile else ''}"
                            f"{', grad checkpointing' if s.grad_checkpointing else ''}) and warming up")
                        runner = Runner(s, mode)
                        for _ in range(warmup):
                            runner()
                        runners.append(runner)
                    for r in range(repeats):
                        for runner in runners:
                            start = time.perf_counter()
                            runner()
                            elapsed = time.perf_counter() - start
                            getattr(group[runner.setting], f"{mode}_times_s").append(elapsed)
                        log(f"{mode} round {r + 1}/{repeats} done")
                    del runners
                    if memory:
                        for s in active:
                            log(f"peak memory of {s.model} ({mode}) in a subprocess")
                            setattr(group[s], f"{mode}_peak_mem_mib", peak_memory_mib(s, mode))
                for res in group.values():
                    _fill_rates(res, peaks)
                results.extend(group.values())
    return results


def _fill_rates(res: Result, peaks: Optional[Dict[str, float]]) -> None:
    flops_per_image = 2 * res.gmacs_per_image
    if res.infer_times_s:
        t = statistics.median(res.infer_times_s)
        res.infer_images_per_s = res.batch_size / t
        res.infer_latency_ms = 1000 * t
        res.infer_gflops = flops_per_image * res.infer_images_per_s
        peak = (peaks or {}).get(f"matmul_{res.dtype}")
        res.infer_fraction_of_peak = res.infer_gflops / peak if peak else None
    if res.train_times_s:
        # A training step costs about 3 forwards (forward, and backward for inputs and weights).
        res.train_images_per_s = res.batch_size / statistics.median(res.train_times_s)
        res.train_gflops = 3 * flops_per_image * res.train_images_per_s


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def speed_ratio(result: Result, baseline: Result, mode: str) -> Optional[float]:
    """Median over rounds of ``baseline time / result time`` (> 1: ``result`` is faster)."""
    mine, theirs = getattr(result, f"{mode}_times_s"), getattr(baseline, f"{mode}_times_s")
    if not mine or len(mine) != len(theirs):
        return None
    return statistics.median(t / m for m, t in zip(mine, theirs))


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: Sequence[Result], baseline: Optional[str] = None) -> str:
    """A console table; ``x base`` columns are ratios to ``baseline`` in the same setting."""
    header = ["model", "size", "batch", "dtype", "compile", "ckpt", "GMACs/img", "infer img/s", "latency ms",
              "GFLOP/s", "% peak", "train img/s", "infer MiB", "train MiB"]
    if baseline:
        header += ["infer x base", "train x base"]
    # Ratios are medians of per-round ratios: models of one round ran back to back under the same load.
    rows = [header]
    for r in results:
        row = [r.model, f"{r.img_size[0]}x{r.img_size[1]}", str(r.batch_size),
               f"{r.dtype} emulated" if r.emulated else r.dtype, "yes" if r.compile else "no",
               "yes" if r.grad_checkpointing else "no",
               f"{r.gmacs_per_image:.2f}", _fmt(r.infer_images_per_s, ".1f"), _fmt(r.infer_latency_ms, ".0f"),
               _fmt(r.infer_gflops, ".0f"),
               _fmt(None if r.infer_fraction_of_peak is None else 100 * r.infer_fraction_of_peak, ".0f"),
               _fmt(r.train_images_per_s, ".1f"), _fmt(r.infer_peak_mem_mib, ".0f"), _fmt(r.train_peak_mem_mib, ".0f")]
        if baseline:
            base = same_setting(results, r, model=baseline)
            for mode in MODES:
                row.append(_fmt(speed_ratio(r, base, mode) if base else None, ".2f"))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def to_json(results: Sequence[Result], peaks: Dict[str, float], info: Dict[str, Any],
            argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return {"machine": info, "peaks_gflops": peaks, "command": list(argv) if argv else None,
            "results": [asdict(r) for r in results]}


def same_setting(results: Sequence[Result], result: Result, **change: Any) -> Optional[Result]:
    """The result measured in ``result``'s setting with ``change`` (e.g. ``compile=False``), if any."""
    want = {name: change.get(name, getattr(result, name))
            for name in ("model", "img_size", "batch_size", "dtype", "compile", "grad_checkpointing")}
    return next((r for r in results if all(getattr(r, name) == value for name, value in want.items())), None)


def checkpointing_summary(results: Sequence[Result]) -> List[str]:
    """One line per model measured with and without gradient checkpointing in the same rounds: the
    training step's time and peak memory with it, over without."""
    lines = []
    for on in (r for r in results if r.grad_checkpointing):
        off = same_setting(results, on, grad_checkpointing=False)
        speed = speed_ratio(off, on, "train") if off else None
        if speed is None:
            continue
        mem = (on.train_peak_mem_mib / off.train_peak_mem_mib
               if on.train_peak_mem_mib and off.train_peak_mem_mib else None)
        lines.append(f"grad checkpointing, {on.model} {on.img_size[0]}x{on.img_size[1]} batch {on.batch_size} "
                     f"{on.dtype}: training step time x{speed:.2f} (median of per-round ratios), peak memory "
                     f"{'-' if mem is None else f'x{mem:.2f}'}")
    return lines


def compile_summary(results: Sequence[Result]) -> List[str]:
    """One line per model measured eager and compiled in the same rounds: compiled speed over eager,
    inference and training step (> 1: compiling made it faster)."""
    lines = []
    for compiled in (r for r in results if r.compile):
        eager = same_setting(results, compiled, compile=False)
        ratios = {mode: speed_ratio(compiled, eager, mode) if eager else None for mode in MODES}
        if all(v is None for v in ratios.values()):
            continue
        lines.append(f"torch.compile, {compiled.model} {compiled.img_size[0]}x{compiled.img_size[1]} batch "
                     f"{compiled.batch_size} {compiled.dtype}{' grad checkpointing' if compiled.grad_checkpointing else ''}: "
                     f"compiled / eager speed, inference {_fmt(ratios['infer'], '.2f')}, training step "
                     f"{_fmt(ratios['train'], '.2f')} (median of per-round ratios)")
    return lines
