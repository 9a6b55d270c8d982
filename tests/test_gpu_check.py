"""benchmarks/gpu_check.sh, the prepared GPU check: its plan (sizes, stages, the offline install), its
refusals of bad arguments, the budget that skips stages, the results it assembles (ratios as medians
of per-round ratios, targets), and, in the slow suite, a dry run on the CPU end to end."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ASSEMBLER = ROOT / "benchmarks" / "gpu_check.py"
SWIN = "swin_tiny_patch4_window7_224"
ORDER = ["install", "cuda_tests", "bench_eager", "bench_compiled_bf16_infer", "bench_compiled_bf16_train", "digits",
         "train", "eval", "export_onnx", "export_safetensors", "eval_export", "bench_compiled_fp32_infer",
         "bench_compiled_fp32_train"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def gpu_check(*args, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], capture_output=True,
                          text=True, timeout=timeout)


def plan(*args):
    """{stage: (limit, needs, command)} of ``--plan``, in the order the stages run."""
    proc = gpu_check("--plan", *args)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()[2:]
    stages = {}
    for head, command in zip(lines[::2], lines[1::2]):
        name, rest = head.split(" (limit ")
        limit, needs = rest.rstrip(")").split("s, needs ")
        stages[name] = (int(limit), needs, command.strip())
    return stages


def test_the_gpu_plan_benchmarks_three_models_at_224_batch_128_and_installs_offline(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "mlxtend-0.25.0-py3-none-any.whl").write_bytes(b"")
    stages = plan("--device", "cuda", "--wheels", str(wheels), "--out", str(tmp_path / "out"))
    assert list(stages) == ORDER
    install = stages["install"][2]
    assert f"--no-index --no-deps --no-compile --no-cache-dir --upgrade --target" in install
    assert f"{wheels}/*.whl" in install and "--no-build-isolation" in install and "--dry-run" not in install
    for name in ORDER[2:5] + ORDER[-2:]:
        command = stages[name][2]
        assert f"--models pale_tiny {SWIN} convnext_tiny --img-size 224 --batch-size 128" in command
        assert "--device cuda" in command and "TORCH_COMPILE_DISABLE" not in command
    assert "--dtype fp32 bf16 --compile no -o" in stages["bench_eager"][2]  # with the memory processes
    assert "--dtype bf16 --compile yes --mode train --no-memory" in stages["bench_compiled_bf16_train"][2]
    assert "--device cuda --amp bf16" in stages["train"][2] and "--epochs 1" in stages["train"][2]
    assert stages["eval_export"][1] == "export_safetensors" and "model.safetensors" in stages["eval_export"][2]
    assert "pytest -m cuda tests" in stages["cuda_tests"][2]
    # every stage could run alone within the default budget, and the budget is under 8 minutes
    budget = int(gpu_check("--plan").stdout.split("budget ")[1].split("s,")[0])
    assert budget < 480 and all(limit < budget for limit, _, _ in stages.values())


def test_the_dry_plan_uses_tiny_sizes_installs_nothing_and_does_not_compile():
    stages = plan("--device", "cpu", "--dry")
    assert list(stages) == ORDER
    assert "--dry-run -e" in stages["install"][2] and "--target" not in stages["install"][2]
    for name in ORDER[2:5] + ORDER[-2:]:
        command = stages[name][2]
        assert f"--models pale_tiny {SWIN} --img-size 64 --batch-size 2 --warmup 1 --repeats 1" in command
        assert ("TORCH_COMPILE_DISABLE=1" in command) == ("compiled" in name)
    assert "--device cpu" in stages["train"][2]
    # bf16 only where the CPU runs it natively: emulated, the epoch would outlast its stage's limit
    assert all("--amp auto" in stages[name][2] for name in ("train", "eval", "eval_export"))


def test_only_keeps_the_named_stages_and_what_they_need():
    assert list(plan("--only", "eval_export")) == ["install", "digits", "train", "export_safetensors", "eval_export"]
    assert list(plan("--only", "bench_compiled_fp32_train,cuda_tests")) == [
        "install", "cuda_tests", "bench_compiled_fp32_train"]


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device must be cuda or cpu, got 'tpu'"),
    (["--budget", "0"], "--budget must be a whole number of seconds > 0, got '0'"),
    (["--budget", "5m"], "--budget must be a whole number of seconds > 0, got '5m'"),
    (["--wheels", "/nonexistent/whl"], "--wheels /nonexistent/whl is not a folder"),
    (["--only", "bench"], "--only: no stage 'bench'"),
    (["--fast"], "unknown argument '--fast'"),
    (["--out"], "--out needs a folder"),
])
def test_bad_arguments_are_refused_in_one_line(args, message):
    proc = gpu_check("--plan", *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr


def test_wheels_folder_without_wheels_and_work_inside_out_are_refused(tmp_path):
    proc = gpu_check("--plan", "--wheels", str(tmp_path))
    assert proc.returncode == 2 and "holds no .whl file" in proc.stderr
    proc = gpu_check("--plan", "--out", str(tmp_path), "--work", str(tmp_path / "work"))
    assert proc.returncode == 2 and "must not lie inside --out" in proc.stderr


def test_a_spent_budget_skips_every_stage_and_says_so(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = gpu_check("--device", "cpu", "--dry", "--budget", "1", "--out", str(out), "--work", str(work))
    assert proc.returncode == 1, proc.stderr
    doc = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in doc["stages"]] == ORDER and doc["passed"] is False
    assert doc["stages"][0]["status"] == "skipped: budget"
    assert all(s["status"].startswith("skipped: needs ") for s in doc["stages"][1:])
    assert "| install | skipped: budget |" in (out / "results.md").read_text()
    assert (out / "logs.tar.gz").is_file() and sorted(p.name for p in out.iterdir()) == [
        "logs.tar.gz", "results.json", "results.md"]


def bench_result(model, dtype, compiled, infer_times, train_times, batch=128):
    """One entry of `pale bench -o`'s "results" (the fields gpu_check.py reads)."""
    median = lambda ts: sorted(ts)[len(ts) // 2]
    return dict(model=model, img_size=[224, 224], batch_size=batch, dtype=dtype, compile=compiled,
                grad_checkpointing=False, emulated=False, device="cuda",
                infer_images_per_s=batch / median(infer_times) if infer_times else None,
                train_images_per_s=batch / median(train_times) if train_times else None,
                infer_latency_ms=1000 * median(infer_times) if infer_times else None,
                infer_peak_mem_mib=None if compiled else 1000.0, train_peak_mem_mib=None if compiled else 9000.0,
                infer_times_s=infer_times, train_times_s=train_times)


def test_assembled_ratios_are_medians_of_per_round_ratios_held_to_the_bf16_targets(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "data").mkdir(parents=True)
    # Per round Swin-T / Pale-T: inference 1.2, 0.5, 1.1 -> median 1.1 (the medians' ratio would be 0.2/0.2 = 1.0);
    # training 0.8, 0.85, 2.0 -> median 0.85, short of 0.9 (the medians' ratio would be 0.4/0.4 = 1.0).
    pale = bench_result("pale_tiny", "bf16", False, [0.1, 0.2, 0.2], [0.5, 0.4, 0.2])
    swin = bench_result(SWIN, "bf16", False, [0.12, 0.1, 0.22], [0.4, 0.34, 0.4])
    machine = dict(device_name="NVIDIA H200", torch="2.11.0")
    (work / "data" / "bench_eager.json").write_text(json.dumps(dict(machine=machine, results=[pale, swin])))
    (work / "data" / "cuda_tests.xml").write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_cuda" name="test_a"/><testcase classname="tests.test_cuda" name="test_b">'
        '<failure message="x"/></testcase></testsuite></testsuites>')
    (work / "stages.tsv").write_text("install\tpassed\t0\t9\t90\tpip ...\ncuda_tests\tfailed\t1\t50\t150\tpytest ...\n"
                                     "bench_eager\tpassed\t0\t99\t180\tpale bench ...\n")
    subprocess.run([sys.executable, str(ASSEMBLER), "assemble", "--work", str(work), "--out", str(out), "--device",
                    "cuda", "--mode", "full", "--budget", "465", "--elapsed", "158"], check=True)
    doc = json.loads((out / "results.json").read_text())
    targets = {t["mode"]: t for t in doc["bench"]["bench_eager"]["targets"]}
    assert targets["infer"]["ratio"] == pytest.approx(1.1) and targets["infer"]["met"] is True
    assert targets["train"]["ratio"] == pytest.approx(0.85) and targets["train"]["met"] is False
    assert doc["cuda_tests"]["passed"] == 2 and doc["cuda_tests"]["failed_tests"] == ["tests.test_cuda::test_b"]
    assert doc["passed"] is False
    md = (out / "results.md").read_text()
    assert "| bf16 | eager | train | 0.85 | 0.9 | NO |" in md and "| bf16 | eager | infer | 1.10 | 1.0 | yes |" in md
    assert "| Pale-T | bf16 | eager | train | 320.0 | 9000 | 0.85 |" in md
    assert "| cuda_tests | failed | 50 | 150 | 2 passed, 1 failed, 0 errors, 1 skipped (tests.test_cuda::test_b) |" in md


@pytest.mark.slow
def test_the_dry_run_on_the_cpu_passes_every_stage(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--dry", "--python", sys.executable, "--out", str(out),
                           "--work", str(work)], capture_output=True, text=True, timeout=1200, env=env)
    doc = json.loads((out / "results.json").read_text())
    failed = {s["name"]: s["status"] for s in doc["stages"] if s["status"] != "passed"}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:])
    assert [s["name"] for s in doc["stages"]] == ORDER
    assert doc["cuda_tests"]["tests"] > 0  # collected, and skipped without CUDA
    for name in ("bench_eager", "bench_compiled_bf16_infer", "bench_compiled_bf16_train"):
        rows = doc["bench"][name]["rows"]
        assert {r["model"] for r in rows} == {"pale_tiny", SWIN} and all(r["images_per_s"] > 0 for r in rows)
    assert doc["eval_export"]["top1"] == doc["eval"]["top1"] and doc["eval"]["n"] == 1000
    assert all(c["max_rel_err"] < 1e-4 for c in doc["export_onnx"]["checks"])
