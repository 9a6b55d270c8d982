"""The benchmark scripts: kernel_floor.py's heavy-kernel share is measured, not assumed; kernel_choice.py
times every attention kernel at a Pale model's stage shapes and marks the fixed rule's pick."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "kernel_floor.py"


@pytest.fixture(autouse=True)
def _scripts_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when run as `python benchmarks/x.py`


def _load():
    spec = importlib.util.spec_from_file_location("kernel_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_heavy_share_separates_gemms_from_elementwise_work():
    floor = _load()
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    x = torch.randn(1 << 20)
    assert floor.heavy_share(lambda: [a @ b for _ in range(4)]) > 0.9          # aten::mm only
    assert floor.heavy_share(lambda: [torch.nn.functional.gelu(x) for _ in range(4)]) < 0.1
    mixed = floor.heavy_share(lambda: (a @ b, torch.nn.functional.gelu(x)))
    assert 0.0 < mixed < 1.0


def test_kernel_choice_times_every_kernel_at_the_stage_shapes_and_marks_the_rules_pick():
    # 64x64: maps 16, 8, 4, 2, none divided by the pale size 7, so every stage's calls are masked.
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "kernel_choice.py"), "--img-size", "64", "--batch-size", "1",
                           "--rounds", "1", "--dtype", "fp32", "bf16", "--mode", "infer", "train"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = lines[2].split()
    assert header[-4:] == ["flash", "math", "explicit", "rule"]
    rows = [line.split() for line in lines if line.split()[:1] and line.split()[0].isdigit()]
    dtypes = ["fp32", "bf16"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ["fp32"]
    assert [(int(r[0]), r[2], r[1]) for r in rows] == [(stage, d, m) for d in dtypes for m in ("infer", "train")
                                                       for stage in (1, 2, 3, 4)]
    from pale.models.attention_kernels import choose_kernel
    for stage, mode, dtype, shape, mask, flash, math, explicit, pick, *flag in rows:
        n, heads, length, d = map(int, shape.split("x"))
        assert mask == "yes" and all(float(t) > 0 for t in (flash, math, explicit))
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        assert pick == choose_kernel("cpu", torch_dtype, length, mode == "train",
                                     n * heads * length * length * torch_dtype.itemsize)
        times = {"flash": float(flash), "math": float(math), "explicit": float(explicit)}
        assert (flag == ["SLOWER"]) == (times[pick] > 1.1 * min(times.values()))
