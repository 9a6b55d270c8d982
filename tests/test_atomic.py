"""Every file a user keeps is written through ``pale.files.atomic_path``: data flushed (fsync) before
the rename, a write that dies half-way (exception or SIGKILL) leaves the old file whole, and every
output gets an ordinary new file's permissions (0o666 minus the umask)."""
import ast
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import matplotlib.figure  # noqa: E402 (patched below; imported here so that no test relies on another's import)
import pale  # noqa: E402,F401
from pale import checkpoint, files  # noqa: E402
from pale.train import train  # noqa: E402
from tiny_train import tiny_recipe, write_tiny_folder  # noqa: E402

SRC = Path(files.__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_thread")


def _figure():
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    fig.gca().plot([0, 1], [1, 0])
    return fig


# Each public writer of pale.files (and save_checkpoint), writing `value` (an int that makes the
# content differ) to a path; and how to read back what it wrote.
WRITERS = {
    "text": (lambda p, v: files.atomic_write_text(p, f"v{v}"), lambda p: p.read_text()),
    "bytes": (lambda p, v: files.atomic_write_bytes(p, bytes([v]) * 100), lambda p: p.read_bytes()),
    "json": (lambda p, v: files.atomic_write_json(p, {"v": v}), lambda p: json.loads(p.read_text())),
    "savefig": (lambda p, v: files.atomic_savefig(_figure(), p, dpi=10 + v), lambda p: p.stat().st_size),
    "torch": (lambda p, v: files.save_torch({"v": torch.full((3,), float(v))}, p), lambda p: files.load_torch(p)["v"].tolist()),
    "safetensors": (lambda p, v: files.save_safetensors({"v": torch.full((3,), float(v))}, p, {"n": v}),
                    lambda p: files.load_safetensors(p)[1]),
    "checkpoint": (lambda p, v: checkpoint.save_checkpoint(p, torch.nn.Linear(2, v + 1), "m", {}),
                   lambda p: files.load_torch(p)["model"]["weight"].shape[0]),
}
SUFFIX = {"savefig": ".png", "torch": ".pth", "checkpoint": ".pth", "safetensors": ".safetensors", "json": ".json"}


def target(tmp_path, name):
    return tmp_path / f"out{SUFFIX.get(name, '.txt')}"


@contextlib.contextmanager
def umask(value):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def atomic_targets(monkeypatch):
    """Records the path of every file written through pale.files.atomic_path."""
    seen = []
    original = files.atomic_path

    @contextlib.contextmanager
    def recording(path, before_replace=None):
        with original(path, before_replace) as tmp:
            yield tmp
        seen.append(Path(path).resolve())
    monkeypatch.setattr(files, "atomic_path", recording)
    return seen


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_fsync_of_the_data_comes_before_the_rename(name, tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        return replace(src, dst)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    write, _ = WRITERS[name]
    write(target(tmp_path, name), 1)
    replaced = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert len(replaced) == 1, events
    inode = events[replaced[0]][1]
    assert ("fsync", inode) in events[:replaced[0]], f"the file was not fsynced before its rename: {events}"
    # then the directory, so that the rename itself survives a crash
    assert ("fsync", tmp_path.stat().st_ino) in events[replaced[0]:], f"the directory was not fsynced: {events}"


@pytest.mark.parametrize("name", sorted(WRITERS))
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_ordinary_permissions(name, mask, tmp_path):
    write, _ = WRITERS[name]
    path = target(tmp_path, name)
    with umask(mask):
        write(path, 1)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_an_exception_mid_write_leaves_the_old_file(name, tmp_path, monkeypatch):
    write, read = WRITERS[name]
    path = target(tmp_path, name)
    write(path, 1)
    before = read(path)

    # Whatever the writer's last step to the disk is, it writes part of the file, then fails.
    write_bytes = Path.write_bytes

    def half_then_fail(*args, **kwargs):
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, (str, Path)) and Path(a).name.startswith("."):
                write_bytes(Path(a), b"PARTIAL")
        raise OSError("disk full")
    for module, attr in ((Path, "write_text"), (Path, "write_bytes"), (torch, "save")):
        monkeypatch.setattr(module, attr, half_then_fail)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write(path, 2)
    monkeypatch.undo()
    assert read(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "a temporary file was left behind"


# The child imports pale.files as any user would (sys.argv[2] names the file, for the error message only).
LOAD_IO = textwrap.dedent("""
    import sys
    import pale.files as files
""")
CHILD = LOAD_IO + textwrap.dedent("""
    import torch
    path = sys.argv[1]
    for i in range(2, 10 ** 6):
        files.save_torch({"v": torch.full((1 << 20,), float(i))}, path)
        if i == 3:
            print("saving", flush=True)
""")


def test_sigkill_mid_write_leaves_a_whole_loadable_file(tmp_path):
    """A process killed while it keeps overwriting a 4 MB checkpoint: the file is always the whole
    old one or the whole new one."""
    path = tmp_path / "last.pth"
    files.save_torch({"v": torch.full((1 << 20,), 1.0)}, path)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), files.__file__], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"saving"
        time.sleep(0.3)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    value = files.load_torch(path)["v"]
    assert value.shape == (1 << 20,) and float(value[0]) >= 3.0 and torch.all(value == value[0])


def test_sigkill_inside_the_writer_keeps_the_old_file(tmp_path):
    """Killed after writing half of the new file: the old one is untouched and loads."""
    path = tmp_path / "best.pth"
    files.save_torch({"v": torch.arange(5.0)}, path)
    code = LOAD_IO + textwrap.dedent("""
        import time
        with files.atomic_path(sys.argv[1]) as tmp:
            tmp.write_bytes(b"half a checkpoint")
            print("written", flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code, str(path), files.__file__], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert files.load_torch(path)["v"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_training_run_writes_every_file_atomically(tmp_path, atomic_targets):
    """Checkpoints, the safetensors export, metrics, config and summary of `pale train`, and the
    image folder it reads, all go through atomic_path, with ordinary permissions."""
    data = write_tiny_folder(tmp_path / "data")
    with umask(0o022):
        train(tiny_recipe(data), [], tmp_path / "run")
    written = [p.resolve() for p in tmp_path.rglob("*") if p.is_file()]
    assert {"last.pth", "best.pth", "best.safetensors", "metrics.jsonl", "summary.json"} <= {p.name for p in written}
    bypassed = [str(p) for p in written if p not in atomic_targets]
    assert not bypassed, f"written without pale.files.atomic_path: {bypassed}"
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written if (p.stat().st_mode & 0o777) != 0o644}
    assert not modes, f"files without 0o644 permissions under umask 022: {modes}"


def test_onnx_export_writes_atomically(tmp_path, atomic_targets):
    from pale.export import export_onnx
    from pale.models.pale_transformer import PaleTransformer

    model = PaleTransformer(embed_dims=(8, 8, 8, 8), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), num_classes=2)
    path = tmp_path / "m.onnx"
    # the dynamo exporter, which writes a file of its own first (static: the same writes, a quarter of the time)
    export_onnx(model, path, trace_size=(64, 64), dynamic=False)
    assert [p.resolve() for p in tmp_path.iterdir()] == [path.resolve()] == atomic_targets


# -- every raw write call in the sources sits inside `with ...atomic_path(...)` ----------------------

WRITE_CALLS = {"save", "savefig", "save_file", "write_text", "write_bytes", "dump", "export", "savez",
               "tofile", "to_csv", "SummaryWriter"}
# Writes that are not a user's file: (file, call, why).
NOT_FILES = {
    ("bench.py", "open"): "/proc/self/clear_refs: a kernel control, not a file",
    ("train/run_folder.py", "SummaryWriter"): "TensorBoard's event log, appended to while training runs",
}


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _is_write_open(call: ast.Call) -> bool:
    mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
    return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and any(c in mode.value for c in "wax+")


def _inside_atomic_path(node: ast.AST, parents) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.With) and any(
                isinstance(item.context_expr, ast.Call) and _call_name(item.context_expr) == "atomic_path"
                for item in node.items):
            return True
    return False


def raw_writes_outside_atomic_path():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "files.py":
            continue
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            if (name in WRITE_CALLS or (name == "open" and _is_write_open(node))) \
                    and (rel, name) not in NOT_FILES and not _inside_atomic_path(node, parents):
                found.append(f"{rel}:{node.lineno} {name}(...)")
    return found


def test_no_file_is_written_outside_atomic_path():
    assert raw_writes_outside_atomic_path() == []


def test_the_source_check_finds_a_bypass(tmp_path, monkeypatch):
    """The check above is not vacuous: a checkpoint saved with a bare torch.save is reported."""
    fake = tmp_path / "pale"
    (fake / "train").mkdir(parents=True)
    (fake / "train" / "engine.py").write_text(
        "import torch\n"
        "def save(path, obj):\n"
        "    torch.save(obj, path)\n"
        "def fine(path, obj):\n"
        "    with files.atomic_path(path) as tmp:\n"
        "        torch.save(obj, tmp)\n")
    monkeypatch.setitem(globals(), "SRC", fake)
    assert raw_writes_outside_atomic_path() == ["train/engine.py:3 save(...)"]


def test_savefig_takes_the_format_from_the_suffix_and_passes_dpi(tmp_path):
    from PIL import Image

    files.atomic_savefig(_figure(), tmp_path / "a.svg")
    assert b"<svg" in (tmp_path / "a.svg").read_bytes()[:500]
    files.atomic_savefig(_figure(), tmp_path / "plain", dpi=20)   # no suffix: PNG
    with Image.open(tmp_path / "plain") as img:
        assert img.format == "PNG" and img.size == (20, 20)     # a 1x1 inch figure at 20 dpi
