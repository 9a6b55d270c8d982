"""The device a command runs on, from its ``--device`` option."""
from __future__ import annotations

from typing import Union

import torch

from .errors import InputError

__all__ = ["resolve_device"]


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """``'auto'``: CUDA when available, else the CPU; otherwise the device named, checked."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available here (use --device auto or cpu)")
    return dev
