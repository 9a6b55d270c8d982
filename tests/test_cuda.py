"""On a GPU: the attention through every SDPA backend it can use equals a float64 CPU reference at odd
sizes with padding masks, a small Pale model in bf16 autocast matches its fp32 CPU self, and `pale`
trains (bf16 autocast, fp16 with the GradScaler), resumes exactly, benchmarks and evaluates on CUDA,
its checkpoints loading on a CPU-only machine. Skipped where CUDA is absent (tests/conftest.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pale
from pale.models import attention_kernels as ak

pytestmark = pytest.mark.cuda

SRC = Path(pale.__file__).resolve().parents[1]
U_BF16 = 2.0 ** -8
# Odd sizes, as padded groups of real images give them: 3 groups, 2 heads, 37 tokens, head dim 32.
N, HEADS, L, D = 3, 2, 37, 32


@pytest.fixture(autouse=True)
def rule_state():
    kernel = ak.get_kernel()
    ak.set_kernel("auto")
    yield
    ak._kernel = kernel


def inputs(dtype, masked, seed=0):
    """q, k, v, the output gradient (on the CPU; values exact in ``dtype``) and a padding key mask."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(N, HEADS, L, D, generator=g).to(dtype) for _ in range(4))
    mask = None
    if masked:  # keys padded at the end of two groups, as row_group_attention builds them
        mask = torch.ones(N, 1, 1, L, dtype=torch.bool)
        mask[0, ..., L - 9:] = False
        mask[2, ..., L - 2:] = False
    return q, k, v, dout, mask


def reference(q, k, v, mask):
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / D ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def with_grads(fn, q, k, v, mask, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, mask)
    out.backward(dout.to(device=out.device, dtype=out.dtype))
    return [t.detach().double().cpu() for t in (out, q.grad, k.grad, v.grad)]


# Which backend runs (SDPA's CUDA priority: flash, efficient, math, cudnn): flash takes no attn_mask and
# no fp32, so `auto` (SDPA's own dispatch) gets flash for unmasked bf16 and the memory-efficient kernel
# for every masked call and for fp32; a forced `flash` falls back to math for those, and a forced
# `cudnn` or `efficient` to math wherever that backend refuses the inputs.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("name", ["auto", "flash", "efficient", "cudnn", "math", "explicit"])
def test_attention_on_cuda_equals_the_float64_reference(name, masked, dtype):
    q, k, v, dout, mask = inputs(dtype, masked)

    def on_cuda(q, k, v, mask):
        with ak.use_kernel(name):
            return ak.attention(q.cuda(), k.cuda(), v.cuda(), None if mask is None else mask.cuda())
    got = with_grads(on_cuda, q, k, v, mask, dout)
    want = with_grads(reference, q.double(), k.double(), v.double(), mask, dout.double())
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        scale = b.abs().max().item()
        # fp32: 2e-3 of the largest value allows TF32 matmuls (10-bit mantissa, u = 2^-11, a few roundings);
        # a wrong scale or an ignored mask errs by tenths. bf16: the inputs are exact bf16 numbers, each
        # result passes through at most four bf16 roundings (scaled q, scores, probabilities, result), and
        # flash's backward rounds dS once more: 8 u of the largest value.
        tol = 2e-3 if dtype == torch.float32 else 8 * U_BF16
        assert (a - b).abs().max().item() <= tol * scale, f"{name} {what}"
    if masked:  # a masked key gets no gradient
        assert not got[2][0, ..., L - 9:, :].any() and not got[3][0, ..., L - 9:, :].any()


@pytest.mark.parametrize("dtype, masked, backend", [
    (torch.bfloat16, False, "flash"), (torch.bfloat16, True, "efficient"), (torch.float32, False, "efficient")])
def test_sdpa_dispatch_takes_the_documented_backend(dtype, masked, backend):
    from torch.profiler import ProfilerActivity, profile

    q, k, v, _, mask = (t.cuda() if t is not None else None for t in inputs(dtype, masked))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ak.attention(q, k, v, mask)
    ops = {e.key for e in prof.key_averages()}
    assert f"aten::_scaled_dot_product_{backend}_attention" in ops, sorted(o for o in ops if "scaled_dot" in o)
    with ak.use_kernel("flash"), profile(activities=[ProfilerActivity.CPU]) as prof:  # forced flash, masked: math
        ak.attention(q, k, v, mask if mask is not None else torch.ones(N, 1, 1, L, dtype=torch.bool, device="cuda"))
    assert "aten::_scaled_dot_product_flash_attention" not in {e.key for e in prof.key_averages()}


def test_small_pale_in_bf16_autocast_on_cuda_matches_fp32_on_the_cpu():
    from pale.models.pale_transformer import PaleTransformer

    torch.manual_seed(0)
    # Pale-T's widths halved and fewer blocks; 100x76 pads every stage (pale size 7), so calls are masked.
    model = PaleTransformer(embed_dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), num_heads=(2, 4, 8, 16),
                            num_classes=10).train()
    x = torch.randn(2, 3, 100, 76)
    cpu_logits = model(x)
    cpu_logits.square().mean().backward()
    cpu_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x.cuda())
    logits.float().square().mean().backward()
    # bf16 keeps 8 bits (0.4%); over a dozen layers the rounding accumulates to about 1% of the logits.
    rel = (logits.float().cpu() - cpu_logits).norm() / cpu_logits.norm()
    assert rel < 0.03, rel
    for n, p in model.named_parameters():
        cos = torch.nn.functional.cosine_similarity(p.grad.cpu().flatten(), cpu_grads[n].flatten(), dim=0)
        assert cos > 0.98, (n, cos)


# ---- the command line on CUDA --------------------------------------------------------------------

# A tiny run of the small_data recipe: 8 images of 24x24 (maps 6/3/2/1 with pale size 5: padded and
# masked everywhere), batch 4, two updates per epoch, a checkpoint after every update.
DEVICE = "cuda"
TINY = ["--recipe", "small_data", "--batch-size", "4", "--workers", "0", "--device", DEVICE,
        "--set", "train.progress=false", "--set", "data.img_size=24", "--set", "model.kwargs.embed_dims=[8,16,16,16]",
        "--set", "model.kwargs.depths=[1,1,1,1]", "--set", "model.kwargs.num_heads=[2,2,2,2]",
        "--set", "train.checkpoint_every_updates=1", "--set", "train.keep_checkpoints=4"]
# Bit-exact CUDA runs need deterministic kernels: cuBLAS's fixed workspace, torch's deterministic
# algorithms (an op without one warns, and the warning is shown if the weights then differ), and the
# explicit attention (plain matmuls) instead of SDPA's fused backward.
DETERMINISTIC = ("import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                 "from pale.cli import main; sys.exit(main(sys.argv[1:]))")


def pale_cli(*argv: str, deterministic: bool = False, cuda_visible: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_WAIT_POLICY="PASSIVE", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    if not cuda_visible:
        env["CUDA_VISIBLE_DEVICES"] = ""  # as on a machine without a GPU
    cmd = [sys.executable, "-c", DETERMINISTIC] if deterministic else [sys.executable, "-m", "pale"]
    proc = subprocess.run(cmd + list(argv), capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tiny_train import write_tiny_folder

    return write_tiny_folder(tmp_path_factory.mktemp("cuda_data"))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # checkpoints hold tensors and plain data only


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_training_step_on_cuda(data, tmp_path, amp):
    out = tmp_path / amp
    pale_cli("train", *TINY, "--data", str(data), "-o", str(out), "--epochs", "1", "--amp", amp)
    ckpt = load(out / "last.pth")
    assert ckpt["runtime"]["device"] == DEVICE
    assert ckpt["runtime"]["amp"] == {"bf16": "bfloat16", "fp16": "float16"}[amp]
    assert (ckpt["scaler"] is not None) == (amp == "fp16")  # the GradScaler only for fp16
    if amp == "fp16":
        assert ckpt["scaler"]["scale"] > 0
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in ckpt["history"])
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_a_cuda_checkpoint_resumes_exactly_and_loads_on_a_cpu_only_machine(data, tmp_path):
    run = ["train", *TINY, "--data", str(data), "--epochs", "2", "--amp", "bf16", "--set", "train.attention_kernel=explicit"]
    straight = tmp_path / "straight"
    pale_cli(*run, "-o", str(straight), deterministic=True)
    # Continue from the checkpoint before the last (after update 3 of 4) in a copy of the run folder.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    (resumed / "last.pth").unlink()
    start = max((p for p in resumed.glob("last*.pth") if load(p)["num_updates"] < 4), key=lambda p: load(p)["num_updates"])
    assert load(start)["num_updates"] == 3
    log = pale_cli(*run, "-o", str(resumed), "--resume", str(start), deterministic=True).stderr
    a, b = load(straight / "last.pth"), load(resumed / "last.pth")
    assert a["num_updates"] == b["num_updates"] == 4
    warnings = [line for line in log.splitlines() if "deterministic" in line]
    for part in ("model", "model_ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key, warnings)

    # pale eval of the CUDA checkpoint with no GPU visible, against the same evaluation on the GPU
    scores = {}
    for device, visible in (("cpu", False), (DEVICE, True)):
        result = tmp_path / f"eval-{device}.json"
        pale_cli("eval", "--checkpoint", str(straight / "last.pth"), "--data", str(data / "val"), "--device", device,
                 "-o", str(result), cuda_visible=visible)
        scores[device] = json.loads(result.read_text())
    # fp32 on both; CUDA's convolutions may run in TF32 (10-bit mantissa), hence 1e-2
    assert scores["cpu"]["loss"] == pytest.approx(scores[DEVICE]["loss"], rel=1e-2)


def test_pale_bench_on_cuda(tmp_path):
    out = tmp_path / "bench.json"
    pale_cli("bench", "--device", "cuda", "--models", "pale_tiny", "swin_tiny_patch4_window7_224", "--img-size", "224",
             "--batch-size", "2", "--dtype", "fp32", "bf16", "--warmup", "1", "--repeats", "2", "--quiet", "-o", str(out))
    doc = json.loads(out.read_text())
    assert doc["machine"]["device"] == "cuda" and doc["machine"]["device_name"] == torch.cuda.get_device_name()
    for r in doc["results"]:
        assert r["device"] == "cuda" and r["infer_images_per_s"] > 0 and r["train_images_per_s"] > 0
        assert 0 < r["train_peak_mem_mib"] < torch.cuda.get_device_properties(0).total_memory / 2 ** 20
