"""pale bench on tiny settings: the table, the JSON, the rates derived from the timings, bad input."""
from __future__ import annotations

import json

import pytest

from pale.bench import (Result, Setting, _fill_rates, checkpointing_summary, compile_summary, format_table, forward_macs,
                        matmul_peak, run_benchmark)
from pale.cli import main


def test_rates_follow_from_times_and_macs():
    res = Result("m", (224, 224), 8, "fp32", False, gmacs_per_image=2.0, infer_times_s=[4.0, 1.0, 2.0],
                 train_times_s=[8.0])
    _fill_rates(res, {"matmul_fp32": 100.0})
    assert res.infer_images_per_s == pytest.approx(4.0)          # median 2 s for 8 images
    assert res.infer_latency_ms == pytest.approx(2000.0)
    assert res.infer_gflops == pytest.approx(16.0)               # 2 x 2 GMACs x 4 img/s
    assert res.infer_fraction_of_peak == pytest.approx(0.16)
    assert res.train_images_per_s == pytest.approx(1.0)


def test_table_ratio_to_baseline():
    # Per-round ratios b/a: infer 2, 2, 8 -> median 2; train 0.5 each round.
    a = Result("a", (32, 32), 1, "fp32", False, 1.0, infer_times_s=[1.0, 2.0, 1.0], train_times_s=[2.0, 4.0, 8.0])
    b = Result("b", (32, 32), 1, "fp32", False, 1.0, infer_times_s=[2.0, 4.0, 8.0], train_times_s=[1.0, 2.0, 4.0])
    lines = format_table([a, b], baseline="b").splitlines()
    assert lines[2].split()[-2:] == ["2.00", "0.50"]
    assert lines[3].split()[-2:] == ["1.00", "1.00"]


def test_emulated_bf16_is_marked():
    r = Result("m", (32, 32), 1, "bf16", False, 1.0, emulated=True, infer_times_s=[1.0])
    _fill_rates(r, None)
    assert format_table([r]).splitlines()[2].split()[3:5] == ["bf16", "emulated"]


def test_run_benchmark_marks_bf16_by_the_machine(monkeypatch):
    import pale.bench as bench
    monkeypatch.setattr(bench, "native_bf16", lambda: False)
    (r,) = run_benchmark(["pale_tiny"], [(32, 32)], [1], dtypes=["bf16"], modes=["infer"], warmup=1, repeats=1,
                         memory=False)
    assert r.emulated
    monkeypatch.setattr(bench, "native_bf16", lambda: True)
    (r,) = run_benchmark(["pale_tiny"], [(32, 32)], [1], dtypes=["bf16"], modes=["infer"], warmup=1, repeats=1,
                         memory=False)
    assert not r.emulated


def test_grad_checkpointing_on_and_off_in_the_same_rounds():
    off, on = run_benchmark(["pale_tiny"], [(32, 32)], [2], warmup=1, repeats=2, memory=False,
                            checkpointing=(False, True))
    assert (off.grad_checkpointing, on.grad_checkpointing) == (False, True)
    assert len(off.train_times_s) == len(on.train_times_s) == 2
    assert len(off.infer_times_s) == 2 and on.infer_times_s == []  # inference: once, without
    (line,) = checkpointing_summary([off, on])
    assert "pale_tiny" in line and "training step time x" in line


def test_eager_and_compiled_in_the_same_rounds(monkeypatch):
    import torch

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))  # no inductor build
    # timm's small test models: the bench's rounds are under test, not a model
    results = run_benchmark(["test_resnet", "test_vit"], [(32, 32)], [2], warmup=1, repeats=3, memory=False,
                            compile_modes=(False, True))
    assert [(r.model, r.compile) for r in results] == [("test_resnet", False), ("test_resnet", True),
                                                       ("test_vit", False), ("test_vit", True)]
    assert all(len(r.infer_times_s) == len(r.train_times_s) == 3 for r in results)
    lines = compile_summary(results)
    assert len(lines) == 2 and lines[0].startswith("torch.compile, test_resnet 32x32 batch 2 fp32: compiled / eager")
    # Ratios: per round eager time / compiled time, median over rounds.
    eager = Result("m", (32, 32), 1, "fp32", False, 1.0, infer_times_s=[2.0, 3.0, 9.0], train_times_s=[1.0, 1.0, 1.0])
    compiled = Result("m", (32, 32), 1, "fp32", True, 1.0, infer_times_s=[1.0, 1.0, 1.0], train_times_s=[2.0, 2.0, 1.0])
    (line,) = compile_summary([eager, compiled])
    assert "inference 3.00, training step 0.50" in line
    assert compile_summary([eager]) == []


def test_forward_macs_counts_attention():
    # Pale-T at 224: 4.2G multiply-adds in the paper; the measured count includes the attention matmuls.
    assert forward_macs("pale_tiny", (224, 224)) / 1e9 == pytest.approx(4.2, rel=0.02)


def test_matmul_peak_is_positive():
    assert matmul_peak(repeats=1, budget_s=0.01) > 0


def test_run_benchmark_tiny():
    (r,) = run_benchmark(["pale_tiny"], [(32, 32)], [2], warmup=1, repeats=2, memory=False,
                         peaks={"matmul_fp32": 1.0})
    assert len(r.infer_times_s) == len(r.train_times_s) == 2
    assert r.infer_images_per_s > 0 and r.train_images_per_s > 0 and r.infer_fraction_of_peak > 0
    assert r.train_peak_mem_mib is None


@pytest.mark.slow
def test_run_benchmark_tiny_with_memory():
    results = run_benchmark(["pale_tiny"], [(32, 32)], [2], warmup=1, repeats=2, memory=True,
                            peaks={"matmul_fp32": 1.0})
    (r,) = results
    assert len(r.infer_times_s) == len(r.train_times_s) == 2
    assert r.infer_images_per_s > 0 and r.train_images_per_s > 0 and r.infer_fraction_of_peak > 0
    assert r.train_peak_mem_mib is not None and r.train_peak_mem_mib > 1


def test_cli_json(tmp_path, capsys, monkeypatch):
    import pale.bench as bench
    monkeypatch.setattr(bench, "machine_peaks", lambda repeats=5, device="cpu": {"matmul_fp32": 50.0, "matmul_bf16": 5.0})
    out = tmp_path / "bench.json"
    rc = main(["bench", "--models", "pale_tiny", "--img-size", "32", "--batch-size", "1", "--mode", "infer",
               "--warmup", "1", "--repeats", "1", "--no-memory", "--quiet", "-o", str(out), "--json"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["results"][0]["model"] == "pale_tiny" and doc["results"][0]["img_size"] == [32, 32]
    assert doc["results"][0]["train_images_per_s"] is None
    printed = capsys.readouterr().out
    assert "pale_tiny" in printed
    # --json prints the same document after the table
    assert json.loads(printed[printed.index("\n{") + 1:])["results"] == doc["results"]


def test_cli_device_cpu_runs_there_and_says_so(tmp_path, capsys, monkeypatch):
    import pale.bench as bench
    seen = []
    monkeypatch.setattr(bench, "machine_peaks", lambda repeats=5, device="cpu": seen.append(device) or {})
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--models", "pale_tiny", "--img-size", "32", "--batch-size", "1",
                 "--mode", "infer", "--warmup", "1", "--repeats", "1", "--no-memory", "--quiet", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert seen == ["cpu"] and doc["machine"]["device"] == "cpu" and doc["results"][0]["device"] == "cpu"
    assert f"device: cpu, {bench.cpu_model_name()}" in capsys.readouterr().out


def test_device_cuda_without_cuda_is_one_line(capsys, monkeypatch):
    import torch

    import pale.bench as bench
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda", "--models", "pale_tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "device cuda: CUDA is not available" in err
    assert bench.resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        Setting("pale_tiny", (32, 32), 1, device="tpu")


def test_cuda_timings_wait_for_the_gpu(monkeypatch):
    import torch

    import pale.bench as bench
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    bench._sync("cpu")
    assert calls == []
    bench._sync("cuda")
    assert calls == ["sync"]


def test_bad_input():
    with pytest.raises(ValueError, match="dtype"):
        Setting("pale_tiny", (32, 32), 1, dtype="fp8")
    with pytest.raises(ValueError, match="unknown model"):
        run_benchmark(["no_such_model"], [(32, 32)], [1], memory=False)
    assert main(["bench", "--models", "pale_tiny", "--repeats", "0"]) == 1
    with pytest.raises(SystemExit):
        main(["bench", "--img-size", "12y3"])


@pytest.mark.parametrize("args, message", [
    (["--img-size", "2"], "argument --img-size: image size must be N or HxW with sides >= 3, got '2'"),
    (["--img-size", "64x2"], "argument --img-size: image size must be N or HxW with sides >= 3, got '64x2'"),
    (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
])
def test_bad_options_are_refused_before_anything_runs(capsys, args, message):
    # --img-size 2 used to fail with the model's ValueError traceback, --threads 0 to run with torch's default
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_unknown_model_is_refused_before_the_machine_is_measured(capsys, monkeypatch):
    import pale.bench as bench

    def measured(*args, **kwargs):
        raise AssertionError("the peaks were measured before the model names were checked")
    monkeypatch.setattr(bench, "machine_peaks", measured)
    assert main(["bench", "--models", "pale_tiny", "pale_tinny"]) == 1
    assert "unknown model 'pale_tinny'" in capsys.readouterr().err
