"""Where and how a training process computes: the device, the precision, the process group of
``torchrun`` (NCCL on GPUs, gloo on CPUs), and the random states that an exact resume restores."""
from __future__ import annotations

import contextlib
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..device import resolve_device
from ..errors import InputError
from ..models.attention_kernels import attention, native_bf16, use_kernel
from ..progress import log
from .recipe import RecipeError

__all__ = ["Runtime", "setup_runtime", "join_process_group", "use_tf32", "cuda_bf16_native", "rng_state", "set_rng_state", "PRECISION_NAMES",
           "log_main", "quiet_worker_warning", "sync_norm_stats", "check_attention_kernel"]

#: autocast dtype -> the name a run's history and checkpoints give it
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Runtime:
    """Where and how this process computes; handed to the task's loss and evaluation."""

    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    channels_last: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """An image batch on the device (channels-last when enabled)."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place, returned); a no-op on one process."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def cuda_bf16_native() -> bool:
    """Whether this GPU computes bf16 natively (Ampere and later); V100 and T4 only emulate it, which
    ``torch.cuda.is_bf16_supported()`` counts unless told not to (older PyTorch has no such argument)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:
        return bool(torch.cuda.is_bf16_supported())


def setup_runtime(device: str = "auto", amp: str = "auto", channels_last: bool = False, tf32: bool = True) -> Runtime:
    """Pick the device and precision; join the process group when launched by torchrun.

    ``amp="auto"``: bf16 where the hardware computes it natively (CPUs with AVX-512-BF16 or AMX, GPUs
    from Ampere on), else fp32 on a CPU and fp16 with a GradScaler on a GPU. ``tf32``: on CUDA,
    fp32 matrix products in TF32 (:func:`use_tf32`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world > 1 or dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    use_tf32(dev, tf32)
    if world > 1 and not dist.is_initialized():
        join_process_group("nccl" if dev.type == "cuda" else "gloo", rank, world)
    if amp == "auto":
        if dev.type == "cpu":
            # emulated bf16 is far slower than fp32 (measured ~1 vs ~170 GFLOP/s on an AVX2-only EPYC)
            amp = "bf16" if native_bf16() else "none"
        else:
            amp = "bf16" if cuda_bf16_native() else "fp16"
    amp_dtypes = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in amp_dtypes:
        raise InputError(f"amp (train.amp, --amp) must be one of auto, {', '.join(amp_dtypes)}; got {amp!r}")
    if amp == "fp16" and dev.type != "cuda":
        raise InputError("amp fp16 (train.amp, --amp) needs a CUDA device; use bf16 (or none) on the CPU")
    if amp == "bf16" and dev.type == "cpu" and rank == 0 and not native_bf16():
        log("warning: this CPU has no native bf16 (AVX-512-BF16 or AMX): bf16 runs emulated, far slower than "
            "float32; amp none (or auto, which chooses it here) is faster")
    return Runtime(dev, amp_dtypes[amp], rank, world, local_rank, channels_last)


#: the environment variable that keeps torchrun from sharing its rendezvous store with the workers
UNSHARED_STORE_VARIABLE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def join_process_group(backend: str, rank: int, world: int) -> None:
    """``dist.init_process_group`` under torchrun, also when torchrun restarts the group.

    By default torchrun (torch 2.4 and later) hands its workers its own rendezvous store
    (``TORCHELASTIC_USE_AGENT_STORE=True``), one store for the whole job: a restarted group finds the
    keys of the group before it there (gloo's peer addresses, barrier counters) and fails to connect
    or waits forever. Here each start keeps its keys under its restart count. On several nodes the
    agents' restart counts need not agree (an agent restarts its workers without counting it when
    another node asks to rejoin), so there a job that may restart is refused unless torchrun's store
    is not shared (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which gives every start a store of its own)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend=backend)
        return
    if int(env.get("GROUP_WORLD_SIZE", "1")) > 1 and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        raise InputError(f"torchrun may restart this job on several nodes, whose restarted group would meet the old "
                         f"group's keys in torchrun's shared store: set {UNSHARED_STORE_VARIABLE}=1 in front of "
                         f"torchrun (with --rdzv-backend=c10d), or --max-restarts=0")
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
                          timeout=default_pg_timeout)
    restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"pale/restart{restart}/", store), rank=rank,
                            world_size=world)


def use_tf32(device: torch.device, enabled: bool) -> None:
    """On CUDA, let fp32 matrix products run in TF32 (``enabled``) or in full fp32; nothing elsewhere.

    PyTorch computes fp32 matmuls in full fp32 by default, several times slower on tensor-core GPUs
    (Ampere on) than TF32's 10-bit mantissa products with fp32 sums, the precision timm's and most
    GPU training uses. It acts on fp32 training (``amp=none``) and on fp32 validation, which the
    trainer runs by default. cuDNN's convolutions use TF32 already by PyTorch's default. A process-wide
    setting; on the CPU it is left alone (there "high" may mean bf16 products)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if enabled else "highest")


def check_attention_kernel(name: str, device: torch.device) -> str:
    """``name`` (``train.attention_kernel``), refused by name unless it is ``auto`` or an attention kernel
    that runs on ``device`` (tried on a tiny input)."""
    if name == "auto":
        return name
    q = torch.zeros(1, 1, 4, 8, device=device)
    try:
        with use_kernel(name):
            attention(q, q, q)
    except ValueError as err:  # a name the kernel module does not know
        raise RecipeError(f"train.attention_kernel={name!r}: {err}") from None
    except RuntimeError as err:
        raise RecipeError(f"train.attention_kernel={name!r} does not run on {device.type}: "
                          f"{str(err).strip().splitlines()[0]}") from None
    return name


def sync_norm_stats(models: List[torch.nn.Module], rt: Runtime, mode: str) -> None:
    """Make the BatchNorm running statistics of ``models`` equal on every rank (they follow each rank's
    own batches): their mean (``mode`` "reduce"), rank 0's ("broadcast"), or leave them ("none")."""
    if not rt.distributed or mode == "none":
        return
    from timm.utils import distribute_bn

    for model in models:
        distribute_bn(model, rt.world_size, reduce=mode == "reduce")


def log_main(text: str) -> None:
    """A message on stderr from rank 0 only (:func:`pale.progress.log`, above a progress bar if one is shown)."""
    if int(os.environ.get("RANK", "0")) == 0:
        log(text)


@contextlib.contextmanager
def quiet_worker_warning() -> Iterator[None]:
    """Silence PyTorch's warning that loader workers exceed the cores, which it repeats for every
    loader and iterator; a run says so once, in its own words (:func:`pale.train.recipe.schedule_warnings`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        yield


# ---- random states -------------------------------------------------------------------------------

def _cuda_device() -> Optional[int]:
    """The index of this process's CUDA device, if it has used CUDA (else no CUDA state to keep)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return None


def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch and (once used) this process's CUDA device's RNG states, as plain
    containers and tensors (weights_only-safe).

    timm seeds (``random_seed``) but has no state capture, which the exact mid-epoch resume needs per
    rank. Only the own device's CUDA state is kept: each rank draws on its own GPU alone, and a resume
    may see another number of GPUs."""
    np_state = np.random.get_state()
    state = dict(python=random.getstate(),
                 numpy=dict(name=np_state[0], keys=torch.from_numpy(np_state[1].astype(np.int64)),
                            pos=int(np_state[2]), has_gauss=int(np_state[3]), gauss=float(np_state[4])),
                 torch=torch.get_rng_state())
    device = _cuda_device()
    if device is not None:
        state["cuda"] = dict(device=device, state=torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`. The CUDA state goes to this process's device (when it has CUDA).

    A checkpoint of an older version holds a list of every visible GPU's state: this device's entry
    is restored if the list has one, else the CUDA generator keeps its seed (the continuation then
    draws other dropout / drop-path masks on the GPU; no error, no warning)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if isinstance(cuda, Mapping):
        torch.cuda.set_rng_state(cuda["state"], device)
    elif device < len(cuda):  # an older checkpoint: one state per GPU then visible
        torch.cuda.set_rng_state(cuda[device], device)
