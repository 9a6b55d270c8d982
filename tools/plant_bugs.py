"""Plant known bugs, one at a time, in a copy of the repository and run the fast tests against each.

Proves the tests still bite: every bug below must make at least one of its tests fail. Each bug is
a list of text edits (a regular expression that must match exactly once, and its replacement), so
a refactor that moves the code makes the script stop with "pattern not found" instead of silently
testing nothing; update the pattern then. A bug may also name ``baseline`` edits, applied to the
copy first (and checked to pass the same tests) when the branch under test does not yet hold the
behaviour the test expects.

    python tools/plant_bugs.py                  # every bug
    python tools/plant_bugs.py gelu_to_relu     # some bugs, by name
    python tools/plant_bugs.py --list

Exit status 1 when a bug is not caught (or its baseline fails). Results are printed as a table.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
MODEL = "src/pale/models/pale_transformer.py"
ENGINE = "src/pale/train/engine.py"
IO = "src/pale/io.py"

# (file, regex, replacement)
Edit = Tuple[str, str, str]

ORACLE = ["tests/test_oracle.py"]
CONFIG = ["tests/test_config_table1.py"]
EMA = ["tests/test_ema.py"]
ATOMIC = ["tests/test_atomic.py"]
RESUME = ["tests/test_train.py::test_resume_is_exact", "tests/test_train.py::test_sigterm_mid_epoch_saves_and_resume_is_exact"]
RECORDS = ["tests/test_checkpoint_records.py"]


@dataclass
class Bug:
    name: str
    what: str
    edits: List[Edit]
    tests: List[str]
    baseline: List[Edit] = field(default_factory=list)


BUGS = [
    # -- the ones an audit found no fast test caught --
    Bug("gelu_to_relu", "the MLP's GELU replaced by ReLU",
        [(MODEL, r"act_layer: Callable\[\.\.\., nn\.Module\] = nn\.GELU", "act_layer: Callable[..., nn.Module] = nn.ReLU")],
        ORACLE + CONFIG),
    Bug("pale_s_heads", "Pale-S built with other heads per stage (2/4/8/8 instead of Table 1's 2/4/8/16)",
        [(MODEL, r'("pale_small": dict\([^\n]*num_heads=)\(2, 4, 8, 16\)', r"\1(2, 4, 8, 8)")],
        CONFIG),
    Bug("ema_never_updated", "the engine never updates its EMA",
        [(ENGINE, r"self\.ema\.update\(unwrap_model\(self\.model\), step=self\.num_updates\)", "pass")],
        EMA),
    Bug("fsync_removed", "fsync removed from the atomic writer",
        [(IO, r"os\.fsync\(fd\)(?=\s*finally:\s*os\.close\(fd\)\s*os\.replace)", "pass")],
        ATOMIC),
    Bug("checkpoint_bypasses_atomic", "save_checkpoint calls torch.save on the target itself",
        [(IO, r"(\*\*extra\)\n\s*)save_torch\(obj, path\)",
          r"\1torch.save(obj, path)")],
        ATOMIC),
    Bug("export_bypasses_atomic", "the engine writes best.safetensors with safetensors' save_file",
        [(ENGINE, r"pio\.save_safetensors\(model\.state_dict\(\), self\.out_dir / name, metadata=dict\(info, weights=which\)\)",
          "__import__('safetensors.torch').torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "
          "str(self.out_dir / name), metadata={k: __import__('json').dumps(v) for k, v in dict(info, weights=which).items()})")],
        ATOMIC),
    Bug("cross_shaped_pale_size", "cross-shaped layers built with the pale size instead of the stripe width",
        [(MODEL, r'group_size = as_pair\(stripe_width, "stripe_width"\)', 'group_size = as_pair(pale_size, "pale_size")')],
        ORACLE + CONFIG),
    Bug("axial_pale_size", "axial layers built with the pale size instead of 1",
        [(MODEL, r"group_size = \(1, 1\)", 'group_size = as_pair(pale_size, "pale_size")')],
        ORACLE + CONFIG),
    Bug("sequential_never_alternates", "sequential blocks all attend along rows",
        [(MODEL, r'\("row" if block_index % 2 == 0 else "column"\)', '"row"')],
        ORACLE + CONFIG),
    # -- kinds the audit found caught (grouping, masks, exact resume): they must stay caught --
    Bug("contiguous_instead_of_interlaced", "PS-attention groups contiguous rows instead of interlaced ones",
        [(MODEL, r'interlaced=mode != "cross_shaped"', "interlaced=False")],
        ORACLE),
    Bug("padded_keys_attended", "padded keys are not masked",
        [(MODEL, r"attend_in_groups\(qg, kg, vg, mask, fused, keep, tokens\)", "attend_in_groups(qg, kg, vg, None, fused, keep, tokens)")],
        ORACLE),
    Bug("branches_swapped", "the row and column branches' outputs concatenated in the wrong order",
        [(MODEL, r"return torch\.cat\(\(rows, cols\), dim=-1\)(?=\n)", "return torch.cat((cols, rows), dim=-1)")],
        ORACLE),
    Bug("attention_unscaled", "attention scores not scaled by head_dim ** -0.5",
        [(MODEL, r'(?s)(def attend_in_groups\(.*?    """\n)', r"\1    q = q * q.shape[-1] ** 0.5\n")],
        ORACLE),
    Bug("bn_fold_without_eps", "eval BatchNorm folded without its epsilon",
        [(MODEL, r"torch\.rsqrt\(self\.bn\.running_var \+ self\.bn\.eps\)", "torch.rsqrt(self.bn.running_var)")],
        ORACLE),
    Bug("cpe_without_residual", "CPE returns DWConv(x) instead of x + DWConv(x)",
        [(MODEL, r"identity\[:, :, 1, 1\] = 1\.0", "identity[:, :, 1, 1] = 0.0")],
        ORACLE),
    Bug("resume_without_rng", "resume does not restore the random number generators",
        [(ENGINE, r"set_rng_state\(rngs\[self\.rt\.rank\]\)", "pass")],
        RESUME),
    Bug("resume_without_optimizer", "resume does not restore the optimizer state",
        [(ENGINE, r'self\.optimizer\.load_state_dict\(ckpt\["optimizer"\]\)', "pass")],
        RESUME),
    # -- what the engine's mutation run found no test for --
    Bug("resume_forgets_best", "a resumed run forgets the best record (and replaces best.pth by a worse epoch)",
        [(ENGINE, r'self\.best = dict\(ckpt\.get\("best"\) or \{\}\)', "self.best = {}")],
        RECORDS),
    Bug("resume_forgets_skipped", "a resumed run forgets the images it skipped before the stop",
        [(ENGINE, r'self\.skipped_images = int\(ckpt\.get\("skipped_images", 0\)\)', "self.skipped_images = 0")],
        RECORDS),
    Bug("export_ema_on_tie", "the exports take the EMA on a tie, while --weights best takes the raw weights",
        [(ENGINE, r'better = ema > raw if', "better = ema >= raw if")],
        RECORDS),
]


class PatternNotFound(RuntimeError):
    pass


def apply(root: Path, edits: Sequence[Edit], bug: str) -> None:
    for rel, pattern, replacement in edits:
        path = root / rel
        text = path.read_text()
        new, count = re.subn(pattern, replacement, text)
        if count != 1:
            raise PatternNotFound(f"{bug}: pattern {pattern!r} matches {count} times in {rel} (expected once); "
                                  f"update it in tools/plant_bugs.py")
        path.write_text(new)


def copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv", "mutants", "runs", "__pycache__", ".pytest_cache",
                                    ".hypothesis", "*.egg-info", "data")
    for name in ("src", "tests", "pyproject.toml"):
        src = ROOT / name
        (shutil.copytree(src, dest / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, dest / name))
    return dest


def run_tests(root: Path, tests: Sequence[str]) -> Tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_WAIT_POLICY="PASSIVE")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider",
                           "-m", "not slow", *tests], cwd=root, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.time() - start


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ")[0]
    return "?"


def check(bug: Bug) -> Tuple[str, str, float]:
    """Plant ``bug`` in a fresh copy and run its tests: ``(verdict, failing test, seconds)``."""
    with tempfile.TemporaryDirectory(prefix=f"plant_{bug.name}_") as tmp:
        root = copy_repo(Path(tmp))
        seconds = 0.0
        if bug.baseline:
            apply(root, bug.baseline, bug.name + " (baseline)")
            code, out, seconds = run_tests(root, bug.tests)
            if code != 0:
                return "BASELINE FAILS", first_failure(out), seconds
        apply(root, bug.edits, bug.name)
        code, out, t = run_tests(root, bug.tests)
        seconds += t
        if code == 1:
            return "caught", first_failure(out), seconds
        if code == 0:
            return "NOT CAUGHT", "-", seconds
        return f"ERROR (pytest exit {code})", out.strip().splitlines()[-1] if out.strip() else "", seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bugs", nargs="*", help="names of the bugs to plant (default: all)")
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
    args = parser.parse_args(argv)
    by_name = {b.name: b for b in BUGS}
    if args.list:
        for b in BUGS:
            print(f"{b.name:34s} {b.what}")
        return 0
    unknown = [n for n in args.bugs if n not in by_name]
    if unknown:
        parser.error(f"unknown bugs {unknown}; --list shows them")
    chosen = [by_name[n] for n in args.bugs] if args.bugs else BUGS
    # Every pattern is checked before anything runs: a stale one fails at once.
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_repo(Path(tmp))
        for bug in chosen:
            shutil.copytree(ROOT / "src", root / "src", dirs_exist_ok=True)
            shutil.copytree(ROOT / "tests", root / "tests", dirs_exist_ok=True)
            if bug.baseline:
                apply(root, bug.baseline, bug.name + " (baseline)")
            apply(root, bug.edits, bug.name)
    failed = 0
    print(f"{'bug':34s} {'verdict':12s} {'time':>6s}  first failing test")
    for bug in chosen:
        verdict, test, seconds = check(bug)
        failed += verdict != "caught"
        print(f"{bug.name:34s} {verdict:12s} {seconds:5.0f}s  {test}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
