"""The CUDA paths of the training runtime, with torch.cuda replaced by fakes (no GPU needed): each rank
saves and restores the RNG state of its own GPU only, so a resume that sees fewer GPUs works; amp=auto
picks bf16 only on GPUs that compute it natively, fp16 (with the GradScaler) on those that emulate it."""
import warnings

import pytest
import torch

from pale.train import runtime


class FakeCuda:
    """``torch.cuda`` of a machine with ``count`` GPUs on which this process uses ``device``; each GPU's
    RNG state is a tensor holding its index. The all-devices calls fail: a rank must not use them."""

    def __init__(self, monkeypatch, count, device):
        self.count, self.device, self.set = count, device, []
        for name, value in dict(is_available=lambda: True, is_initialized=lambda: True, device_count=lambda: count,
                                current_device=lambda: self.device, get_rng_state=self.get, set_rng_state=self.put,
                                get_rng_state_all=self.forbidden, set_rng_state_all=self.forbidden).items():
            monkeypatch.setattr(torch.cuda, name, value)

    def get(self, device="cuda"):
        assert isinstance(device, int) and device < self.count
        return torch.tensor([device], dtype=torch.uint8)

    def put(self, state, device="cuda"):
        assert isinstance(device, int) and device < self.count, f"no GPU {device} among {self.count}"
        self.set.append((int(state[0]), device))

    def forbidden(self, *args):
        raise AssertionError("one state per visible GPU: a rank saves and restores its own device's only")


def test_a_rank_saves_the_rng_state_of_its_own_gpu(monkeypatch):
    FakeCuda(monkeypatch, count=4, device=2)
    state = runtime.rng_state()
    assert state["cuda"]["device"] == 2 and state["cuda"]["state"].tolist() == [2]


def test_a_resume_with_fewer_gpus_restores_each_rank_state_onto_its_own_device(monkeypatch):
    FakeCuda(monkeypatch, count=4, device=3)
    saved = runtime.rng_state()                      # rank 3 of a 4-GPU run
    cuda = FakeCuda(monkeypatch, count=2, device=1)  # the same rank's state, resumed on the second of 2 GPUs
    runtime.set_rng_state(saved)
    assert cuda.set == [(3, 1)]


def test_an_old_checkpoint_with_every_gpu_state_restores_this_device_entry(monkeypatch):
    states = [torch.tensor([i], dtype=torch.uint8) for i in range(4)]
    old = dict(runtime.rng_state(), cuda=states)
    cuda = FakeCuda(monkeypatch, count=2, device=1)
    runtime.set_rng_state(old)
    assert cuda.set == [(1, 1)]


def test_an_old_checkpoint_without_this_device_entry_leaves_the_cuda_generator_quietly(monkeypatch, capsys):
    old = dict(runtime.rng_state(), cuda=[torch.tensor([0], dtype=torch.uint8)])
    cpu_draw = (torch.manual_seed(5), torch.rand(3))[1]
    cuda = FakeCuda(monkeypatch, count=4, device=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.set_rng_state(old)
    assert cuda.set == [] and capsys.readouterr().err == ""
    assert not torch.equal(torch.rand(3), cpu_draw)  # the CPU state was restored all the same


def fake_gpu(monkeypatch, is_bf16_supported):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


@pytest.mark.parametrize("native, amp", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_auto_on_cuda_takes_bf16_only_where_it_is_native(monkeypatch, native, amp):
    """A V100 or T4 emulates bf16 (``is_bf16_supported()`` says True, counting the emulation); auto gives it
    fp16 with the GradScaler, as the CPU path refuses emulated bf16."""
    fake_gpu(monkeypatch, lambda including_emulation=True: native or including_emulation)
    assert runtime.setup_runtime("cuda", "auto").amp_dtype == amp


@pytest.mark.parametrize("supported, amp", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_auto_on_cuda_with_a_pytorch_that_cannot_leave_out_emulation(monkeypatch, supported, amp):
    fake_gpu(monkeypatch, lambda: supported)  # older PyTorch: no including_emulation argument
    assert runtime.setup_runtime("cuda", "auto").amp_dtype == amp


def test_a_job_that_torchrun_may_restart_on_several_nodes_with_its_shared_store_is_refused(monkeypatch):
    for name, value in dict(TORCHELASTIC_USE_AGENT_STORE="True", GROUP_WORLD_SIZE="2", TORCHELASTIC_MAX_RESTARTS="3",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(runtime.InputError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        runtime.join_process_group("gloo", 0, 16)


@pytest.mark.parametrize("device, enabled, precision", [("cuda", True, "high"), ("cuda", False, "highest"),
                                                         ("cpu", True, None)])
def test_fp32_matmuls_run_in_tf32_on_cuda_unless_told_not_to_and_the_cpu_is_left_alone(monkeypatch, device, enabled,
                                                                                       precision):
    seen = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", seen.append)
    runtime.use_tf32(torch.device(device), enabled)
    assert seen == ([precision] if precision else [])
