"""The benchmark scripts: kernel_floor.py's heavy-kernel share is measured, not assumed; kernel_choice.py
times the measured kernel choice against fixed kernels and the peer."""
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


def test_kernel_choice_prints_each_kernel_against_auto_and_the_peer():
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "kernel_choice.py"), "--img-size", "32", "--batch-size", "2",
                           "--rounds", "1", "--kernels", "flash", "explicit"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("fp32")]
    assert [(r[1], r[2]) for r in rows] == [(m, k) for m in ("infer", "train")
                                            for k in ("auto", "flash", "explicit", "Swin-T")]
    for dtype, mode, kernel, *numbers in rows:
        assert all(float(n) > 0 for n in numbers)
        # seconds, then (for a fixed kernel) its time over auto's, then (for Pale) Swin-T's over Pale's
        assert len(numbers) == {"auto": 2, "Swin-T": 1}.get(kernel, 3)
