"""The parts of benchmarks/gpu_check.sh written in Python.

``environment FILE``: the interpreter, PyTorch and its device, and every distribution the project
needs (pyproject.toml: ``dependencies`` and the ``data`` and ``test`` extras) with the installed version,
as JSON; lists those missing or outside the stated range. Fails only when ``pale`` or torch cannot be
imported: a missing package fails the stages that need it, and the others still run.

``assemble --work DIR --out DIR ...``: results.json and results.md from the stages run so far
(``stages.tsv``) and what they wrote (``data/``). It imports neither torch nor pale, so that it runs
in a moment after every stage and also when the install failed.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "swin_tiny_patch4_window7_224"
PALE = "pale_tiny"
#: Pale-T / Swin-T in bf16 that the check is held to (the issue's targets), eager and compiled
TARGETS = {("bf16", "train"): 0.9, ("bf16", "infer"): 1.0}
SHORT = {"pale_tiny": "Pale-T", BASELINE: "Swin-T", "convnext_tiny": "ConvNeXt-T"}


# ---------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------

def requirements() -> List[str]:
    """The requirement strings of the project, its ``data`` extra and its ``test`` extra, the extras
    that ``test`` names of its own project included."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    out, todo, seen = list(project["dependencies"]), ["data", "test"], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in extras.get(extra, []):
            own = re.fullmatch(re.escape(project["name"]) + r"\[(.+)\]", req.replace(" ", ""))
            if own:
                todo += own.group(1).split(",")
            else:
                out.append(req)
    return out


def environment(path: Path) -> int:
    from importlib import metadata

    from packaging.requirements import Requirement

    import torch

    import pale

    cuda = torch.cuda.is_available()
    doc: Dict[str, Any] = {
        "python": sys.version.split()[0], "executable": sys.executable, "pale": str(Path(pale.__file__).parent),
        "torch": torch.__version__, "cuda_available": cuda, "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name() if cuda else None,
        "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False) if cuda else None,
        "packages": {}, "missing": [], "outside_range": [],
    }
    for text in requirements():
        req = Requirement(text)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            version = None
        doc["packages"][req.name] = version
        if version is None:
            doc["missing"].append(str(req))
        elif not req.specifier.contains(version, prereleases=True):
            doc["outside_range"].append(f"{req} (installed {version})")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    print(f"torch {doc['torch']}, CUDA {doc['cuda']}, device {doc['device_name'] or 'cpu'}; pale from {doc['pale']}")
    for key in ("missing", "outside_range"):
        if doc[key]:
            print(f"{key.replace('_', ' ')}: {', '.join(doc[key])}")
    return 0


# ---------------------------------------------------------------------------------------------------
# assemble
# ---------------------------------------------------------------------------------------------------

def read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_stages(path: Path) -> List[Dict[str, Any]]:
    stages = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, status, rc, seconds, limit, command = line.split("\t", 5)
        stages.append(dict(name=name, status=status, exit_code=None if rc == "-" else int(rc),
                           seconds=int(seconds), limit_s=int(limit), command=command, log=f"logs/{name}.log"))
    return stages


def junit_counts(path: Path) -> Optional[Dict[str, Any]]:
    """Counts of a pytest JUnit report and the names of the tests that failed or erred."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def per_round_ratio(mine: List[float], theirs: List[float]) -> Optional[float]:
    """Median over rounds of the baseline's time over this model's (> 1: faster), as `pale bench`'s
    ratio columns (pale.bench.speed_ratio, not imported: this script runs without torch)."""
    if not mine or len(mine) != len(theirs):
        return None
    return statistics.median(t / m for m, t in zip(mine, theirs))


def bench_rows(doc: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    """One row per model, setting and mode (inference or training step) of a `pale bench` JSON."""
    results = doc.get("results", [])
    for r in results:
        base = next((b for b in results if b["model"] == BASELINE and all(
            b[k] == r[k] for k in ("img_size", "batch_size", "dtype", "compile", "grad_checkpointing"))), None)
        for mode in ("infer", "train"):
            if r.get(f"{mode}_images_per_s") is None:
                continue
            ratio = per_round_ratio(r[f"{mode}_times_s"], base[f"{mode}_times_s"]) if base else None
            yield dict(model=r["model"], img_size=r["img_size"], batch_size=r["batch_size"],
                       dtype=r["dtype"] + (" emulated" if r.get("emulated") else ""), compiled=r["compile"],
                       mode=mode, images_per_s=r[f"{mode}_images_per_s"],
                       peak_mem_mib=r.get(f"{mode}_peak_mem_mib"), vs_swin_t=ratio,
                       latency_ms=r.get("infer_latency_ms") if mode == "infer" else None)


def target_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for r in rows:
        if r["model"] != PALE or r["vs_swin_t"] is None:
            continue
        target = TARGETS.get((r["dtype"], r["mode"]))
        out.append(dict(dtype=r["dtype"], compiled=r["compiled"], mode=r["mode"], ratio=r["vs_swin_t"], target=target,
                        met=None if target is None else r["vs_swin_t"] >= target))
    return out


def stage_summary(name: str, doc: Dict[str, Any]) -> str:
    """One line of what a stage found, from the files it wrote (empty when it wrote none)."""
    if name == "install" and doc.get("environment"):
        env = doc["environment"]
        text = f"torch {env['torch']}, CUDA {env['cuda']}, {env['device_name'] or 'no GPU'}"
        return text + "".join(f"; {k.replace('_', ' ')}: {', '.join(env[k])}" for k in ("missing", "outside_range")
                              if env[k])
    if name == "cuda_tests" and doc.get("cuda_tests"):
        c = doc["cuda_tests"]
        text = f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
        return text + (f" ({', '.join(c['failed_tests'][:5])})" if c["failed_tests"] else "")
    if doc["bench"].get(name):
        return f"{len(doc['bench'][name]['rows'])} rows on {doc['bench'][name]['device_name']}"
    if name == "train" and doc.get("train"):
        last = doc["train"].get("last", {})
        return (f"val top-1 {last.get('val_top1')} (EMA {last.get('ema_val_top1')}), "
                f"{last.get('train_images_per_s')} images/s, {doc['train'].get('train_time_s')} s")
    if name in ("eval", "eval_export") and doc.get(name):
        e = doc[name]
        text = f"top-1 {e['top1']:.2f}, top-5 {e['top5']:.2f}, loss {e['loss']:.4f} ({e['weights']} weights, {e['amp']})"
        if name == "eval_export" and doc.get("eval"):
            text += "; same top-1 as the checkpoint" if e["top1"] == doc["eval"]["top1"] else "; top-1 DIFFERS from the checkpoint's"
        return text
    if name == "export_onnx" and doc.get("export_onnx"):
        x = doc["export_onnx"]
        worst = max((c["max_rel_err"] for c in x.get("checks", [])), default=None)
        return f"{x['exporter']} exporter, opset {x['opset']}, max rel err {worst:.2g} vs PyTorch over {len(x['checks'])} sizes"
    return ""


def assemble(args: argparse.Namespace) -> int:
    work, out = Path(args.work), Path(args.out)
    data = work / "data"
    doc: Dict[str, Any] = dict(device=args.device, mode=args.mode, budget_s=args.budget, elapsed_s=args.elapsed,
                               work=str(work), environment=read_json(data / "environment.json"),
                               cuda_tests=junit_counts(data / "cuda_tests.xml"),
                               train=read_json(data / "train_summary.json"), eval=read_json(data / "eval.json"),
                               eval_export=read_json(data / "eval_export.json"),
                               export_onnx=read_json(data / "export_onnx.json"), bench={})
    for path in sorted(data.glob("bench_*.json")):  # one per benchmark stage, named after it
        name, bench = path.stem, read_json(path)
        if bench:
            rows = list(bench_rows(bench))
            doc["bench"][name] = dict(device_name=bench["machine"].get("device_name"), torch=bench["machine"].get("torch"),
                                      peaks_gflops=bench.get("peaks_gflops"), rows=rows, targets=target_rows(rows))
    doc["stages"] = read_stages(work / "stages.tsv")
    for s in doc["stages"]:
        s["summary"] = stage_summary(s["name"], doc)
    doc["passed"] = bool(doc["stages"]) and all(s["status"] == "passed" for s in doc["stages"])
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"  # whole files only: the device may stop this script at any moment
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out / "results.json")
    tmp = out / "results.md.tmp"
    tmp.write_text(markdown(doc))
    tmp.replace(out / "results.md")
    return 0


def _f(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(doc: Dict[str, Any]) -> str:
    env = doc.get("environment") or {}
    lines = [f"# pale GPU check ({doc['mode']}, --device {doc['device']})", "",
             f"{env.get('device_name') or 'no GPU'}; torch {env.get('torch', '?')}, CUDA {env.get('cuda')}; "
             f"{doc['elapsed_s']} s of a {doc['budget_s']} s budget; "
             f"{'every stage passed' if doc['passed'] else 'NOT every stage passed'}.", "",
             "| stage | status | s | limit s | result |", "|---|---|---:|---:|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['limit_s']} | {s['summary']} |" for s in doc["stages"]]
    rows = sorted((r for b in doc["bench"].values() for r in b["rows"]),
                  key=lambda r: (not r["dtype"].startswith("fp32"), r["compiled"], r["mode"]))  # models: as run
    if rows:
        sizes = sorted({f"{r['img_size'][0]}x{r['img_size'][1]}, batch {r['batch_size']}" for r in rows})
        lines += ["", f"## pale bench: {'; '.join(sizes)}, {next(iter(doc['bench'].values()))['device_name']}", "",
                  "Peak MiB: peak memory allocated over the built model (CUDA; RSS on the CPU), eager only. "
                  "x Swin-T: median of per-round ratios of Swin-T's time to the model's.", "",
                  "| model | dtype | eager/compiled | step | images/s | peak MiB | x Swin-T |",
                  "|---|---|---|---|---:|---:|---:|"]
        lines += [f"| {SHORT.get(r['model'], r['model'])} | {r['dtype']} | {'compiled' if r['compiled'] else 'eager'} | "
                  f"{r['mode']} | {r['images_per_s']:.1f} | {_f(r['peak_mem_mib'], '.0f')} | {_f(r['vs_swin_t'], '.2f')} |"
                  for r in rows]
    targets = sorted((t for b in doc["bench"].values() for t in b["targets"]),
                     key=lambda t: (not t["dtype"].startswith("fp32"), t["compiled"], t["mode"]))
    if targets:
        lines += ["", "## Pale-T / Swin-T (median of per-round ratios)", "",
                  "| dtype | eager/compiled | step | ratio | target | met |", "|---|---|---|---:|---:|---|"]
        lines += [f"| {t['dtype']} | {'compiled' if t['compiled'] else 'eager'} | {t['mode']} | {t['ratio']:.2f} | "
                  f"{_f(t['target'], '.1f')} | {'-' if t['met'] is None else 'yes' if t['met'] else 'NO'} |" for t in targets]
    if doc["mode"] == "dry":
        lines += ["", "Dry run: tiny sizes, the compiled stages ran with TORCH_COMPILE_DISABLE=1 (eager), and the digits "
                      "run in auto precision (bf16 only on a CPU with native bf16): these figures check the commands, "
                      "not the speed."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("environment", help="versions of torch, the device and the project's packages, as JSON")
    e.add_argument("file", type=Path)
    a = sub.add_parser("assemble", help="results.json and results.md from a work folder")
    a.add_argument("--work", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--device", required=True)
    a.add_argument("--mode", choices=["dry", "full"], required=True)
    a.add_argument("--budget", type=int, required=True)
    a.add_argument("--elapsed", type=int, required=True)
    args = p.parse_args(argv)
    return environment(args.file) if args.command == "environment" else assemble(args)


if __name__ == "__main__":
    sys.exit(main())
