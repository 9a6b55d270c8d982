"""How a training run stops early: a non-finite loss, or a signal (SIGTERM, SIGUSR1, Ctrl-C) that
asks the run to save and exit at the next update, on every rank at once."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator, Optional

import torch

from ..errors import InputError
from .runtime import Runtime

__all__ = ["NonFiniteLossError", "TrainingInterrupted", "StopSignals"]


class NonFiniteLossError(InputError):
    """The loss became NaN or infinite (and ``train.on_nonfinite`` is ``stop``)."""


class TrainingInterrupted(SystemExit):
    """Raised after SIGTERM / SIGUSR1 / SIGINT once the checkpoint is saved; exit code 128 + signal number.

    SIGUSR1 (what Slurm's ``--signal`` sends ahead of a time limit) gives 138: "saved, requeue me"; a job
    script requeues on it and the same command with ``--resume auto`` continues exactly.
    """


class StopSignals:
    """Inside :meth:`handled`, SIGTERM, SIGUSR1 and SIGINT are noted rather than fatal (a second Ctrl-C
    stops at once); :meth:`requested` says, the same on every rank, whether one came."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.received: Optional[int] = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    @property
    def flag(self) -> float:
        """1.0 once a signal came to this process, else 0.0 (summed over ranks, > 0 means stop)."""
        return 1.0 if self.received is not None else 0.0

    def requested(self) -> bool:
        flag = torch.tensor([self.flag])
        if self.rt.distributed:  # every rank stops at the same update
            flag = flag.to(self.rt.device)
            self.rt.all_reduce_sum(flag)
        return bool(flag.item() > 0)

    def interrupted(self) -> TrainingInterrupted:
        """The exit to raise once the checkpoint is saved, and the signal's name."""
        return TrainingInterrupted(128 + int(self.received or signal.SIGTERM))

    @contextlib.contextmanager
    def handled(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        stops = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
        old = {s: signal.signal(s, self._on_signal) for s in stops}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
