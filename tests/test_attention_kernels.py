"""The measured attention kernel: every path equals a float64 reference (values and gradients) in
float32 and bfloat16; the selection logic with a fake timer; saved choices; no timing under tracing."""
from __future__ import annotations

import json
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn as nn

from pale.models import attention_kernels as ak

CPU_KERNELS = ak.CANDIDATES["cpu"]
U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)


@pytest.fixture(autouse=True)
def fresh_selector(monkeypatch):
    forced = ak.get_kernel()  # the suite's pinned kernel (tests/conftest.py), restored after each test
    monkeypatch.delenv(ak.CACHE_ENV, raising=False)
    monkeypatch.delenv(ak.KERNEL_ENV, raising=False)
    monkeypatch.delenv(ak.CAP_ENV, raising=False)
    ak.set_kernel(None)
    ak.set_memory_cap(None)
    ak.clear_kernel_choices()
    yield
    ak.set_kernel(forced)  # not from the environment: the test's monkeypatch is undone after this
    ak.set_memory_cap(ak.DEFAULT_MEMORY_CAP_MB * 2 ** 20)
    ak.clear_kernel_choices()


class FakeTimer:
    """Stands in for :func:`ak.measure_seconds`: fixed seconds per kernel, and a log of what was timed."""

    def __init__(self, seconds: Dict[str, float]):
        self.seconds = seconds
        self.timed: List[str] = []

    def __call__(self, runs, repeats=3):
        for run in runs.values():
            run()  # the closures must work, whatever the fake says they cost
        self.timed.extend(runs)
        return {name: self.seconds[name] for name in runs}


@pytest.fixture
def fake_timer(monkeypatch):
    timer = FakeTimer({"flash": 3.0, "math": 2.0, "explicit": 1.0})
    monkeypatch.setattr(ak, "measure_seconds", timer)
    return timer


def inputs(n=3, heads=2, length=20, d=8, dtype=torch.float32, masked=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, heads, length, d, generator=g).to(dtype) for _ in range(3))
    mask = None
    if masked:  # padded keys at the end of some groups, as row_group_attention builds them
        valid = torch.full((n, 1, 1, length), True)
        valid[0, ..., length - 6:] = False
        valid[2, ..., length - 1:] = False
        mask = valid
    return q, k, v, mask


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
@pytest.mark.parametrize("name", CPU_KERNELS)
def test_fp32_paths_equal_reference(name, masked):
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
@pytest.mark.parametrize("name", CPU_KERNELS)
def test_bf16_paths_within_rounding_bound(name, masked):
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
        # within 4 u of the largest magnitude (measured: 0.5-2.6 u on this machine).
        assert (a.double() - b).abs().max() <= 4 * U_BF16 * b.abs().max(), f"{name} {what}"


def test_cpu_flash_is_the_flash_kernel():
    from torch.profiler import ProfilerActivity, profile

    q, k, v, mask = inputs()
    with ak.use_kernel("flash"), profile(activities=[ProfilerActivity.CPU]) as prof:
        ak.attention(q, k, v, mask)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in {e.key for e in prof.key_averages()}


# ---- selection ---------------------------------------------------------------------------------

def test_picks_fastest_and_measures_once_per_key(fake_timer):
    q, k, v, mask = inputs()
    assert ak.select_kernel(q, k, v, mask) == "explicit"
    assert fake_timer.timed == list(CPU_KERNELS)
    fake_timer.seconds = {"flash": 0.1, "math": 2.0, "explicit": 1.0}  # a later measurement would pick flash
    assert ak.select_kernel(q, k, v, mask) == "explicit"
    q2, k2, v2, mask2 = inputs(length=17)  # same class: length 17 and 20 both round up to 32
    assert ak.select_kernel(q2, k2, v2, mask2) == "explicit"
    assert len(fake_timer.timed) == len(CPU_KERNELS)


def test_keys_separate_dtype_shape_mask_and_training(fake_timer):
    q, k, v, mask = inputs()
    ak.attention(q, k, v, mask)
    variants = [
        inputs(dtype=torch.float64),          # dtype
        inputs(length=40),                    # length class 64
        inputs(n=5),                          # batch class 8
        inputs(heads=4),                      # heads
        inputs(masked=False),                 # no mask
    ]
    for q2, k2, v2, m2 in variants:
        ak.attention(q2, k2, v2, m2)
    q.requires_grad_(True)
    ak.attention(q, k, v, mask)               # training: needs the backward timed too
    with torch.no_grad():
        ak.attention(q, k, v, mask)           # grad disabled: the inference key again, no measurement
    keys = [ak.KernelKey.parse(s) for s in ak.kernel_choices()["choices"]]
    assert len(keys) == len(set(keys)) == 7
    assert len(fake_timer.timed) == 7 * len(CPU_KERNELS)
    assert {key.train for key in keys} == {False, True}


def test_training_measurement_times_the_backward(monkeypatch):
    calls = []

    def timer(runs, repeats=3):
        for run in runs.values():
            with torch.autograd.profiler.profile() as prof:
                run()
            calls.append(any("backward" in e.name.lower() for e in prof.function_events))
        return {name: 1.0 for name in runs}

    monkeypatch.setattr(ak, "measure_seconds", timer)
    q, k, v, mask = inputs()
    ak.attention(q, k, v, mask)
    assert calls == [False] * len(CPU_KERNELS)
    ak.attention(q.requires_grad_(True), k, v, mask)
    assert calls[len(CPU_KERNELS):] == [True] * len(CPU_KERNELS)


def test_measurement_rounds_interleave_candidates():
    order = []
    times = ak.measure_seconds({name: (lambda name=name: order.append(name)) for name in ("a", "b")}, repeats=3)
    assert order == ["a", "b"] * 3 and set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


def test_forced_kernel_skips_measurement(fake_timer, monkeypatch):
    q, k, v, mask = inputs()
    with ak.use_kernel("flash"):
        assert ak.select_kernel(q, k, v, mask) == "flash"
    assert fake_timer.timed == [] and ak.get_kernel() == "auto"
    monkeypatch.setenv(ak.KERNEL_ENV, "math")
    ak.set_kernel(None)
    assert ak.select_kernel(q, k, v, mask) == "math" and fake_timer.timed == []
    monkeypatch.setenv(ak.KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="PALE_ATTN_KERNEL"):
        ak.set_kernel(None)
    ak._state.kernel = "fastest"  # as read at import, which does not raise: the first call does
    with pytest.raises(ValueError, match="'fastest' .*PALE_ATTN_KERNEL"):
        ak.attention(q, k, v, mask)
    with pytest.raises(ValueError, match="unknown attention kernel"):
        ak.set_kernel("flashy")
    ak.set_kernel("cudnn")
    with pytest.raises(ValueError, match="not available on cpu"):
        ak.select_kernel(q, k, v, mask)


def test_memory_cap_refuses_explicit(fake_timer):
    q, k, v, mask = inputs()                          # scores: 3 x 2 x 20 x 20 float32 = 9600 bytes
    ak.set_memory_cap(9600 - 1)
    assert ak.select_kernel(q, k, v, mask) == "math"  # explicit is fastest but over the cap
    assert "explicit" not in fake_timer.timed
    # A measurement taken under a larger cap still respects the cap per call, on the exact shape.
    ak.clear_kernel_choices()
    ak.set_memory_cap(9600)
    assert ak.select_kernel(q, k, v, mask) == "explicit"
    q2, k2, v2, mask2 = inputs(length=32)             # same class, 2.56x the scores
    assert ak.select_kernel(q2, k2, v2, mask2) == "math"
    with ak.use_kernel("explicit"):                   # forcing bypasses the cap
        assert ak.select_kernel(q2, k2, v2, mask2) == "explicit"


def test_memory_cap_env(monkeypatch, fake_timer):
    monkeypatch.setenv(ak.CAP_ENV, "0")
    ak.set_memory_cap(None)
    q, k, v, mask = inputs()
    assert ak.select_kernel(q, k, v, mask) == "math"
    monkeypatch.setenv(ak.CAP_ENV, "lots")
    with pytest.raises(ValueError, match="PALE_ATTN_MEMORY_CAP_MB"):
        ak.set_memory_cap(None)


def test_failing_candidate_is_left_out(monkeypatch, fake_timer):
    def broken(q, k, v, mask=None):
        raise RuntimeError("no kernel for these inputs")

    monkeypatch.setitem(ak._KERNELS["cpu"], "explicit", broken)
    q, k, v, mask = inputs()
    assert ak.select_kernel(q, k, v, mask) == "math"
    (entry,) = ak.kernel_choices()["choices"].values()
    assert set(entry["times_s"]) == {"flash", "math"}


# ---- saving and restoring ----------------------------------------------------------------------

def test_choices_round_trip_through_a_checkpoint(fake_timer, tmp_path):
    q, k, v, mask = inputs()
    ak.attention(q, k, v, mask)
    saved = ak.kernel_choices()
    path = tmp_path / "ckpt.pth"
    torch.save({"attention_kernels": saved}, path)
    ak.clear_kernel_choices()
    ak.load_kernel_choices(torch.load(path, weights_only=True)["attention_kernels"])
    fake_timer.seconds = {"flash": 0.1, "math": 2.0, "explicit": 1.0}
    assert ak.select_kernel(q, k, v, mask) == "explicit"   # the restored choice, not a new measurement
    assert len(fake_timer.timed) == len(CPU_KERNELS)
    assert ak.kernel_choices()["choices"] == saved["choices"]
    with pytest.raises(ValueError, match="not saved attention kernel choices"):
        ak.load_kernel_choices({"flash": 1})
    with pytest.raises(ValueError, match="not an attention kernel key"):
        ak.load_kernel_choices({"format": 1, "choices": {"cpu/float32": saved["choices"][str(ak.kernel_key(q, True, False))]}})


def test_disk_cache_round_trip(fake_timer, tmp_path, monkeypatch):
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"another machine": {"cpu/float32/n4/h2/l32/d8/mask/infer":
                                                    {"shape": [3, 2, 20, 8], "times_s": {"flash": 1.0}}}}))
    monkeypatch.setenv(ak.CACHE_ENV, str(path))
    q, k, v, mask = inputs()
    assert ak.select_kernel(q, k, v, mask) == "explicit"      # the other machine's entry is not used
    doc = json.loads(path.read_text())
    assert set(doc) == {"another machine", ak.hardware_id()}
    assert doc[ak.hardware_id()][str(ak.kernel_key(q, True, False))]["times_s"]["explicit"] == 1.0
    ak.clear_kernel_choices()                                 # a new process, as far as the cache goes
    fake_timer.seconds = {"flash": 0.1, "math": 2.0, "explicit": 1.0}
    assert ak.select_kernel(q, k, v, mask) == "explicit"
    assert len(fake_timer.timed) == len(CPU_KERNELS)
    path.write_text("[1, 2")
    ak.clear_kernel_choices()
    with pytest.raises(ValueError, match="PALE_ATTN_CACHE"):
        ak.select_kernel(q, k, v, mask)


# ---- tracing -----------------------------------------------------------------------------------

class Attend(nn.Module):
    def forward(self, q, k, v, mask):
        return ak.attention(q, k, v, mask)


def test_no_timing_under_jit_trace_fx_or_flop_counting(fake_timer):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v, mask = inputs()
    want = reference(q, k, v, mask).float()
    with pytest.warns(FutureWarning):  # torch.jit.trace is deprecated, and still what ONNX's TorchScript exporter runs
        traced = torch.jit.trace(Attend(), (q, k, v, mask), check_trace=False)  # its check reruns eagerly
    torch.testing.assert_close(traced(q, k, v, mask), want, rtol=1e-6, atol=1e-6)
    graph = torch.fx.symbolic_trace(Attend())
    assert any(n.target is torch.nn.functional.scaled_dot_product_attention for n in graph.graph.nodes)
    torch.testing.assert_close(graph(q, k, v, mask), want, rtol=1e-6, atol=1e-6)
    # As pale.complexity counts: the math backend's two matmuls, and nothing else (no timing runs).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        ak.attention(q, k, v, mask)
    n, heads, length, d = q.shape
    assert counter.get_total_flops() == 2 * 2 * n * heads * length * length * d
    assert fake_timer.timed == []


def test_no_timing_under_torch_compile(fake_timer):
    torch._dynamo.reset()
    q, k, v, mask = inputs()
    compiled = torch.compile(Attend(), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), reference(q, k, v, mask).float(), rtol=1e-6, atol=1e-6)
    with ak.use_kernel("explicit"):  # a forced explicit kernel is traced as such
        torch._dynamo.reset()
        compiled = torch.compile(Attend(), backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(q, k, v, mask), reference(q, k, v, mask).float(), rtol=1e-6, atol=1e-6)
    assert fake_timer.timed == []


def test_model_records_one_choice_per_stage_shape(fake_timer):
    from pale.models.pale_transformer import PaleTransformer

    model = PaleTransformer(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2),
                            pale_size=3, num_classes=5).eval()
    with torch.no_grad(), ak.recording() as calls:
        model(torch.randn(1, 3, 48, 48))   # maps 12, 6, 3, 2: square with pale size 3 except the last
    assert [shape for _, shape, _ in calls] == [(8, 1, 36, 8), (4, 1, 18, 16), (2, 1, 9, 16),
                                                (1, 1, 6, 32), (1, 1, 6, 32)]
    assert {kernel for *_, kernel in calls} == {"explicit"}
    assert [key.masked for key, *_ in calls] == [False, False, False, True, True]
