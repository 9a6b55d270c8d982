"""How often a training update makes the host wait for the device: every read of a tensor's value by
pale's own code (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool()``, ``float()``,
``int()``), every reduction over ranks and every blocking copy to the device, counted in a short run
on the CPU, where each would be a synchronisation on a GPU. The loader's own work (decoding and
augmenting images on the host) is not counted."""
import collections
import os
import sys

import pytest
import torch

import pale
from pale.train import Trainer, train
from pale.train.runtime import Runtime
from test_train import Spy, tiny_recipe

PALE = os.path.dirname(pale.__file__)
HOST_DATA = (os.path.join(PALE, "train", "data.py"), os.path.join(PALE, "data"))
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class HostReads:
    """Counts the reads of tensor values that pale's code makes while ``on`` (by caller, for the message)."""

    def __init__(self, monkeypatch):
        self.on, self.sites, self.blocking_copies = False, collections.Counter(), []
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        original_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if self.on and self._ours(caller) and not kwargs.get("non_blocking", False) and \
                    any(isinstance(a, (torch.device, str)) for a in args):
                self.blocking_copies.append(f"{caller.co_filename}:{caller.co_name}")
            return original_to(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, "to", to)

    @staticmethod
    def _ours(code):
        return code.co_filename.startswith(PALE) and not code.co_filename.startswith(HOST_DATA)

    def _counted(self, name, original):
        def read(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if self.on and self._ours(caller):
                self.sites[f"{os.path.relpath(caller.co_filename, PALE)}:{caller.co_name}:{name}"] += 1
            return original(tensor, *args, **kwargs)
        return read


@pytest.mark.parametrize("accum", [1, 2])
def test_an_update_waits_for_the_device_once(accum, tmp_path, monkeypatch, one_thread):
    from test_train import make_folder

    folder = make_folder(tmp_path / "data")
    reads = HostReads(monkeypatch)
    reductions = Spy(monkeypatch, Runtime, "all_reduce_sum")
    updates = Spy(monkeypatch, Trainer, "_optimizer_step")
    train_epoch = Trainer._train_epoch

    def counted_epoch(self, *args):
        reads.on = True
        before = reductions.calls
        try:
            return train_epoch(self, *args)
        finally:
            reads.on = False
            counted_epoch.reductions += reductions.calls - before
    counted_epoch.reductions = 0
    monkeypatch.setattr(Trainer, "_train_epoch", counted_epoch)
    train(tiny_recipe(epochs=2, **{"train.accum_steps": accum}), [f"data.root={folder}"], tmp_path / "run")
    assert updates.calls == 6
    assert sum(reads.sites.values()) <= updates.calls, reads.sites
    assert counted_epoch.reductions <= updates.calls
    assert reads.blocking_copies == []


def test_ddp_does_not_broadcast_buffers_at_every_forward():
    """BatchNorm statistics are made equal at each epoch's end (train.dist_bn) and each rank's are kept in
    checkpoints (tests/test_train_dist.py resumes exactly from them), not broadcast per micro-batch."""
    import torch.distributed as dist
    from pale.train.build import wrap_distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rt = Runtime(torch.device("cpu"), None, rank=0, world_size=1)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        # (PyTorch's newer name for the flag: forward_sync_buffers; the old one stays readable)
        assert wrap_distributed(model, rt, False, {}).broadcast_buffers is False
    finally:
        dist.destroy_process_group()


def test_loaders_on_cuda_pin_memory_and_keep_their_workers(tmp_path, monkeypatch, one_thread):
    """What a GPU run's loaders are given (with CUDA only named: nothing is loaded here)."""
    from test_train import make_folder
    from pale.train.build import build_loaders
    from pale.train.classification import ClassificationTask
    from pale.train.run import resolve_config

    folder = make_folder(tmp_path / "data")
    cfg = resolve_config(tiny_recipe(**{"train.workers": 2}), [f"data.root={folder}"])
    rt = Runtime(torch.device("cuda", 0), None)
    task = ClassificationTask(cfg)
    task.runtime = rt
    task.build_model()  # on the CPU: it reads the model's data config
    loaders = build_loaders(task, cfg, rt, 0, lambda text: None)
    for loader in (loaders.train, loaders.val):
        assert loader.pin_memory and loader.persistent_workers and loader.num_workers == 2
        assert loader.prefetch_factor == 2
