"""benchmarks/kernel_floor.py: the heavy-kernel share it divides by is measured, not assumed."""
import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_floor.py"


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
