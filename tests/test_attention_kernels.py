"""The attention kernels: the fixed rule against its table, every kernel against a float64 reference
(values and gradients, float32 and bfloat16), the override and the memory cap, forced SDPA backends
that fall back instead of failing, no clock on the model's path, and the graph paths."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pale.models import attention_kernels as ak

CPU_KERNELS = ak.CANDIDATES["cpu"]
U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
MIB = 2 ** 20
# Pale-T's attention calls at 224x224, batch 8, one branch: (batch x groups, heads, tokens, head dim) per stage.
PALE_T_STAGES = [(128, 1, 392, 32), (64, 2, 196, 32), (32, 4, 98, 32), (16, 8, 49, 32)]


@pytest.fixture(autouse=True)
def rule_state(monkeypatch):
    """Each test starts from the rule (``auto``) and the default cap, and leaves the suite's state as it was."""
    kernel, cap = ak.get_kernel(), ak._memory_cap
    monkeypatch.delenv(ak.KERNEL_ENV, raising=False)
    monkeypatch.delenv(ak.CAP_ENV, raising=False)
    ak.set_kernel(None)
    ak.set_memory_cap(None)
    yield
    ak._kernel, ak._memory_cap = kernel, cap


def inputs(n=3, heads=2, length=20, d=8, dtype=torch.float32, masked=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, heads, length, d, generator=g).to(dtype) for _ in range(3))
    mask = None
    if masked:  # padded keys at the end of some groups, as row_group_attention builds them
        mask = torch.full((n, 1, 1, length), True)
        mask[0, ..., length - 6:] = False
        mask[2, ..., length - 1:] = False
    return q, k, v, mask


# ---- the rule ----------------------------------------------------------------------------------

CAP = ak.DEFAULT_MEMORY_CAP_MB * MIB
# One row per line of the module's table (and its edges): device, dtype, L, training, score bytes -> kernel.
TABLE = [
    ("cpu", torch.float32, 392, False, MIB, "flash"),
    ("cpu", torch.float32, 49, True, MIB, "flash"),
    ("cpu", torch.float64, 49, False, MIB, "flash"),
    ("cpu", torch.bfloat16, 392, False, MIB, "flash"),
    ("cpu", torch.bfloat16, 256, False, MIB, "flash"),        # the threshold itself
    ("cpu", torch.float16, 392, False, MIB, "flash"),
    ("cpu", torch.bfloat16, 255, False, MIB, "explicit"),
    ("cpu", torch.bfloat16, 196, False, MIB, "explicit"),
    ("cpu", torch.float16, 49, False, MIB, "explicit"),
    ("cpu", torch.bfloat16, 392, True, MIB, "explicit"),
    ("cpu", torch.bfloat16, 49, True, MIB, "explicit"),
    ("cpu", torch.float16, 392, True, MIB, "explicit"),
    ("cpu", torch.bfloat16, 49, True, CAP, "explicit"),       # at the cap: allowed
    ("cpu", torch.bfloat16, 49, True, CAP + 1, "flash"),      # over it: never explicit
    ("cpu", torch.bfloat16, 49, False, CAP + 1, "flash"),
    ("cuda", torch.float32, 49, False, MIB, "sdpa"),
    ("cuda", torch.bfloat16, 49, True, MIB, "sdpa"),
    ("cuda", torch.bfloat16, 392, False, CAP + 1, "sdpa"),
]


@pytest.mark.parametrize("device, dtype, length, train, score_bytes, expected", TABLE)
def test_rule_follows_its_table(device, dtype, length, train, score_bytes, expected):
    assert ak.choose_kernel(device, dtype, length, train, score_bytes) == expected


@pytest.mark.parametrize("dtype, train, expected", [
    (torch.float32, False, ["flash"] * 4), (torch.float32, True, ["flash"] * 4),
    # the measured bf16 table: flash at inference in stage 1 only, explicit everywhere else
    (torch.bfloat16, False, ["flash", "explicit", "explicit", "explicit"]),
    (torch.bfloat16, True, ["explicit"] * 4),
])
def test_pale_t_stages_get_the_measured_fastest_kernel(dtype, train, expected):
    got = []
    for shape in PALE_T_STAGES:
        q = torch.zeros(shape, dtype=dtype, requires_grad=train)
        got.append(ak.kernel_for(q, q, q))
    assert got == expected


def test_training_is_grad_mode_and_an_input_that_needs_grad():
    q, k, v, mask = inputs(dtype=torch.bfloat16, length=300)   # inference at L >= 256: flash; training: explicit
    assert ak.kernel_for(q, k, v, mask) == "flash"
    assert ak.kernel_for(q, k, v.requires_grad_(True), mask) == "explicit"
    with torch.no_grad():
        assert ak.kernel_for(q, k, v, mask) == "flash"


def test_memory_cap_falls_back_to_flash(monkeypatch):
    q, k, v, mask = inputs(dtype=torch.bfloat16)            # scores: 3 x 2 x 20 x 20 bf16 = 4800 bytes
    assert ak.kernel_for(q, k, v, mask) == "explicit"
    ak.set_memory_cap(4800)
    assert ak.kernel_for(q, k, v, mask) == "explicit"
    ak.set_memory_cap(4800 - 1)
    assert ak.kernel_for(q, k, v, mask) == "flash"
    torch.testing.assert_close(ak.attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               rtol=0, atol=0)
    with ak.use_kernel("explicit"):                          # a forced kernel is what was asked for, cap or not
        assert ak.kernel_for(q, k, v, mask) == "explicit"
    monkeypatch.setenv(ak.CAP_ENV, "0")
    ak.set_memory_cap(None)
    assert ak.kernel_for(q, k, v, mask) == "flash"
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(ak.CAP_ENV, bad)
        with pytest.raises(ValueError, match=f"PALE_ATTN_MEMORY_CAP_MB='{bad}' is not a number of MiB >= 0"):
            ak.set_memory_cap(None)
    with pytest.raises(ValueError, match="memory cap must be >= 0"):
        ak.set_memory_cap(-1)


def test_override_by_environment_and_by_call(monkeypatch):
    q, k, v, mask = inputs()
    with ak.use_kernel("explicit"):
        assert ak.kernel_for(q, k, v, mask) == "explicit" and ak.get_kernel() == "explicit"
        with ak.use_kernel("auto"):
            assert ak.kernel_for(q, k, v, mask) == "flash"
    assert ak.get_kernel() == "auto"
    monkeypatch.setenv(ak.KERNEL_ENV, " Math ")
    ak.set_kernel(None)
    assert ak.kernel_for(q, k, v, mask) == "math"
    ak.set_kernel("auto")
    assert ak.kernel_for(q, k, v, mask) == "flash"


def test_bad_kernel_names_are_one_line_errors(monkeypatch):
    q, k, v, mask = inputs()
    with pytest.raises(ValueError, match=r"^unknown attention kernel 'flashy' \(set_kernel\); expected auto or one of "
                                         r"flash, efficient, cudnn, math, explicit$"):
        ak.set_kernel("flashy")
    monkeypatch.setenv(ak.KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="'fastest' .*PALE_ATTN_KERNEL"):
        ak.set_kernel(None)
    ak._kernel = "fastest"  # as read at import, which does not raise: the first call does
    with pytest.raises(ValueError, match="'fastest' .*PALE_ATTN_KERNEL"):
        ak.attention(q, k, v, mask)
    ak.set_kernel("cudnn")
    with pytest.raises(ValueError, match="^attention kernel 'cudnn' is not available on cpu; expected auto or one of "
                                         "flash, math, explicit$"):
        ak.attention(q, k, v, mask)


def test_two_processes_choose_the_same_kernels_whatever_the_load():
    # Each process prints the kernel of Pale-T's stage calls in fp32 and bf16, inference and training;
    # the second chooses while another thread keeps the CPU busy. Nothing is timed, so load cannot matter.
    code = f"""
import sys, threading, torch
from pale.models import attention_kernels as ak
ak.set_kernel('auto')
stop = threading.Event()
def burn():
    a = torch.randn(256, 256)
    while not stop.is_set():
        a @ a
burner = threading.Thread(target=burn)
if sys.argv[1] == 'loaded':
    burner.start()
for dtype in (torch.float32, torch.bfloat16):
    for train in (False, True):
        for shape in {PALE_T_STAGES!r}:
            q = torch.zeros(shape, dtype=dtype, requires_grad=train)
            print(dtype, train, shape, ak.kernel_for(q, q, q))
stop.set()
if burner.is_alive():
    burner.join()  # a thread still inside a matmul when the interpreter exits aborts it
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, load], stdout=subprocess.PIPE, text=True)
             for load in ("idle", "loaded")]  # at once: most of each one's time is importing torch
    outs = [proc.communicate(timeout=300)[0].splitlines() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert len(outs[0]) == 16 and outs[0] == outs[1]
    assert {line.split()[-1] for line in outs[0]} == {"flash", "explicit"}


# ---- every kernel against the float64 reference -------------------------------------------------

def reference(q, k, v, mask):
    """Masked attention in float64, written out."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("nhqd,nhkd->nhqk", q, k) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("nhqk,nhkd->nhqd", scores.softmax(-1), v)


def run_with_grads(fn, q, k, v, mask, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, mask)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in (q, k, v)]


def through_kernel(name):
    def fn(q, k, v, mask):
        with ak.use_kernel(name):
            return ak.attention(q, k, v, mask)
    return fn


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("name", ("auto",) + CPU_KERNELS)
def test_fp32_kernels_equal_reference(name, masked):
    # float32 carries 24 bits: 1e-6 is a few ulps of these O(1) values after two length-20 reductions.
    q, k, v, mask = inputs(masked=masked)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    got = run_with_grads(through_kernel(name), q, k, v, mask, dout)
    want = run_with_grads(reference, q.double(), k.double(), v.double(), mask, dout.double())
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name} {what}: {m}")
    if masked:  # a masked key gets no gradient
        assert not got[2][0, ..., -6:, :].any() and not got[3][0, ..., -6:, :].any()


def bf16_error_bounds(q, k, v, mask, dout):
    """First-order rounding-error bounds (elementwise) for bf16 attention, from float64 magnitudes.

    Every bf16 rounding changes a value by at most ``u = 2^-8`` relative. Rounding ``q / sqrt(d)`` and
    the scores moves a score by at most ``2 u |s|_abs`` (``|s|_abs = |q| |k|^T / sqrt(d)``, which bounds
    the terms whatever cancels), and softmax turns a score error ``e`` into a relative probability
    error of at most ``2 e``; rounding the probabilities, the output and the gradients' intermediate
    products adds a few ``u`` more. Products are accumulated in float32 (``L u_fp32 << u``), so ``L``
    does not enter. Hence ``|error| <= (6 + 4 max|s|_abs) u x magnitude``, where each magnitude is the
    computation with every term made positive (e.g. ``P |V|`` for the output).
    """
    q, k, v, dout = (t.double() for t in (q, k, v, dout))
    scale = q.shape[-1] ** -0.5
    s = scale * q @ k.transpose(-2, -1)
    s_abs = scale * q.abs() @ k.abs().transpose(-2, -1)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
        s_abs = s_abs.masked_fill(~mask, 0.0)
    p = s.softmax(-1)
    dp_abs = dout.abs() @ v.abs().transpose(-2, -1)
    ds_abs = p * (dp_abs + (p * dp_abs).sum(-1, keepdim=True))
    c = (6 + 4 * s_abs.max().item()) * U_BF16
    return [c * m for m in (p @ v.abs(), scale * ds_abs @ k.abs(), scale * ds_abs.transpose(-2, -1) @ q.abs(),
                            p.transpose(-2, -1) @ dout.abs())]


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("name", ("auto",) + CPU_KERNELS)
def test_bf16_kernels_within_rounding_bound(name, masked):
    # Inputs are bf16 numbers, so the float64 reference sees exactly what the kernels see.
    q, k, v, mask = inputs(length=49, d=32, dtype=torch.bfloat16, masked=masked)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = run_with_grads(through_kernel(name), q, k, v, mask, dout)
    want = run_with_grads(reference, q.double(), k.double(), v.double(), mask, dout.double())
    bounds = bf16_error_bounds(q, k, v, mask, dout)
    for what, a, b, bound in zip(("out", "dq", "dk", "dv"), got, want, bounds):
        assert a.dtype == torch.bfloat16
        excess = ((a.double() - b).abs() - bound).max().item()
        assert excess <= 1e-12, f"{name} {what}: error exceeds the bf16 rounding bound by {excess:.3g}"
        # The bound is worst-case (all roundings aligned; 37 u here). Each result passes through at most
        # four bf16 roundings (q scaling, scores, probabilities, result), so in practice the error stays
        # within 4 u of the largest magnitude.
        assert (a.double() - b).abs().max() <= 4 * U_BF16 * b.abs().max(), f"{name} {what}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_rows", ["per group", "one for all", "none"])
def test_explicit_in_chunks_equals_reference(monkeypatch, dtype, mask_rows):
    # Chunks of 2 groups over 5 (the last chunk short), with a mask per group, one mask row broadcast over
    # every group, or none: values and gradients as exact as the kernels' reference tests demand.
    q, k, v, mask = inputs(n=5, length=49, d=32, dtype=dtype, masked=mask_rows != "none")
    if mask_rows == "one for all":
        mask = mask[2:3]
    monkeypatch.setattr(ak, "CHUNK_BYTES", 2 * 2 * 49 * 49 * q.element_size())
    assert ak.chunk_groups(q, k) == 2
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = run_with_grads(through_kernel("explicit"), q, k, v, mask, dout)
    want = run_with_grads(reference, q.double(), k.double(), v.double(), mask, dout.double())
    bounds = bf16_error_bounds(q, k, v, mask, dout) if dtype == torch.bfloat16 else [1e-6] * 4
    for what, a, b, bound in zip(("out", "dq", "dk", "dv"), got, want, bounds):
        assert a.dtype == dtype
        assert ((a.double() - b).abs() - bound).max() <= 1e-12, f"{what} ({mask_rows})"


def test_chunks_hold_at_most_chunk_bytes_of_scores():
    # Pale-T's stage shapes at batch 8 in bf16 and fp32: a chunk's scores fit CHUNK_BYTES, and a chunk of
    # one more group would not (or every group is in one chunk); a group larger than the chunk goes alone.
    for shape in PALE_T_STAGES + [(2, 1, 2000, 32)]:
        for dtype in (torch.bfloat16, torch.float32):
            q = torch.empty(shape, dtype=dtype)
            n, heads, length, _ = shape
            group_bytes = heads * length * length * q.element_size()
            chunk = ak.chunk_groups(q, q)
            assert chunk >= 1
            assert chunk == 1 or chunk * group_bytes <= ak.CHUNK_BYTES
            assert chunk >= n or (chunk + 1) * group_bytes > ak.CHUNK_BYTES


def test_cpu_flash_is_the_flash_kernel():
    from torch.profiler import ProfilerActivity, profile

    q, k, v, mask = inputs()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ak.attention(q, k, v, mask)       # the rule's fp32 choice, as forced flash is
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in {e.key for e in prof.key_averages()}


# ---- forced SDPA backends fall back instead of failing ------------------------------------------

@pytest.mark.parametrize("name, first", [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                                         ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)])
def test_forced_backends_keep_math_as_fallback(name, first):
    assert ak.sdpa_backends(name) == list(dict.fromkeys([first, SDPBackend.MATH]))
    # On the CPU neither efficient nor cudnn exists, as on CUDA flash takes no mask and no fp32: alone they
    # raise; with the fallback the call runs (through math) and is exact.
    q, k, v, mask = inputs()
    if name in ("efficient", "cudnn"):
        with pytest.raises(RuntimeError, match="No viable backend"), sdpa_kernel([first]):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with sdpa_kernel(ak.sdpa_backends(name), **ak._PRIORITY):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["flash", "efficient", "cudnn", "math"])
def test_a_forced_cuda_kernel_runs_where_its_backend_cannot(name, monkeypatch):
    # The CUDA branch of attention(), run on CPU tensors by listing CUDA's kernels for the CPU: each
    # forced backend goes through sdpa_kernel with math as fallback, masked and in fp32.
    entered = []
    real = ak.sdpa_kernel

    def recording(backends, **kwargs):
        entered.append((list(backends), kwargs))
        return real(backends, **kwargs)
    monkeypatch.setattr(ak, "sdpa_kernel", recording)
    monkeypatch.setitem(ak.CANDIDATES, "cpu", ak.CANDIDATES["cuda"])
    q, k, v, mask = inputs()
    with ak.use_kernel(name):
        out = ak.attention(q, k, v, mask)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), rtol=1e-6, atol=1e-6)
    expected = [] if name == "flash" else [(ak.sdpa_backends(name), ak._PRIORITY)]  # CPU flash: default dispatch
    assert entered == expected


# ---- nothing on the model's path reads a clock ---------------------------------------------------

CLOCKS = ("perf_counter", "perf_counter_ns", "time", "time_ns", "monotonic", "monotonic_ns", "process_time")


def test_pale_t_forward_and_backward_read_no_clock(monkeypatch, one_thread):
    import timm

    import pale  # noqa: F401  (registers the models)

    def clock(*args):
        raise AssertionError("a clock was read on the model's path")
    chosen = []
    real = ak.kernel_for
    monkeypatch.setattr(ak, "kernel_for", lambda *a: chosen.append(real(*a)) or chosen[-1])
    model = timm.create_model("pale_tiny", num_classes=10)
    x = torch.randn(1, 3, 224, 224)
    with monkeypatch.context() as clocks:
        for name in CLOCKS:
            clocks.setattr(time, name, clock)
        for dtype in (torch.float32, torch.bfloat16):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                model.train()(x).sum().backward()
                with torch.no_grad():
                    model.eval()(x)
    # Depths 2, 2, 16, 2: one call per block (square maps that the pale size divides: both branches in one
    # call). fp32: flash everywhere; bf16: explicit in training and at inference in stages 2-4, flash at
    # inference in stage 1 (L = 392).
    assert len(chosen) == 4 * 22
    fp32, bf16_train, bf16_infer = chosen[:44], chosen[44:66], chosen[66:]
    assert set(fp32) == {"flash"} and set(bf16_train) == {"explicit"}
    assert bf16_infer == ["flash"] * 2 + ["explicit"] * 20


# ---- tracing and compiling -----------------------------------------------------------------------

class Attend(nn.Module):
    def forward(self, q, k, v, mask):
        return ak.attention(q, k, v, mask)


def test_jit_trace_fx_and_flop_counting_take_plain_sdpa():
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v, mask = inputs()
    want = reference(q, k, v, mask).float()
    with pytest.warns(FutureWarning):  # torch.jit.trace is deprecated, and still what ONNX's TorchScript exporter runs
        traced = torch.jit.trace(Attend(), (q, k, v, mask), check_trace=False)
    assert "scaled_dot_product_attention" in str(traced.graph)
    torch.testing.assert_close(traced(q, k, v, mask), want, rtol=1e-6, atol=1e-6)
    graph = torch.fx.symbolic_trace(Attend())
    assert any(n.target is F.scaled_dot_product_attention for n in graph.graph.nodes)
    torch.testing.assert_close(graph(q, k, v, mask), want, rtol=1e-6, atol=1e-6)
    with ak.use_kernel("explicit"):  # forced explicit is traced as such
        graph = torch.fx.symbolic_trace(Attend())
    assert not any(n.target is F.scaled_dot_product_attention for n in graph.graph.nodes)
    # As pale.complexity counts: the math backend's two matmuls, and nothing else.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        ak.attention(*inputs(dtype=torch.bfloat16))
    n, heads, length, d = q.shape
    assert counter.get_total_flops() == 2 * 2 * n * heads * length * length * d


@pytest.mark.parametrize("dtype, uses_sdpa", [(torch.float32, True), (torch.bfloat16, False)])
def test_torch_compile_applies_the_rule(dtype, uses_sdpa):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    q, k, v, mask = inputs(dtype=dtype)
    compiled = torch.compile(Attend(), backend=backend, fullgraph=True)
    out = compiled(q, k, v, mask)
    (gm,) = graphs
    assert any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes) == uses_sdpa
    torch.testing.assert_close(out, ak.attention(q, k, v, mask), rtol=0, atol=0)
    torch._dynamo.reset()


def test_torch_export_takes_plain_sdpa():
    q, k, v, mask = inputs(dtype=torch.bfloat16)   # the rule would say explicit
    program = torch.export.export(Attend(), (q, k, v, mask))
    assert "scaled_dot_product" in str(program.graph)
