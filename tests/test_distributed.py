"""The DeepSpeed CPU-op build lock: a dead builder's lock must not hang every later init_distributed."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from runtime.distributed import OP_NAME, STALE_LOCK_S, clear_stale_build_lock


def _lock(tmp_path):
    return tmp_path / "py_ext" / OP_NAME / "lock"


def test_stale_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "py_ext"))
    lock = _lock(tmp_path)
    lock.parent.mkdir(parents=True)
    lock.touch()
    assert not clear_stale_build_lock()  # a build in progress: its lock stays
    assert lock.exists()
    old = time.time() - STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert clear_stale_build_lock()
    assert not lock.exists()
    assert not clear_stale_build_lock()  # nothing to remove


def test_init_distributed_survives_a_stale_lock(tmp_path):
    """A process that left the lock behind (killed while torch held it) would make this hang forever. The op built
    at install time is copied beside the lock (times kept, so ninja finds it up to date): the lock is what is under
    test, not a one-minute rebuild; without a built op (no compiler) the op is built or its failure reported."""
    ext = tmp_path / "py_ext"
    lock = ext / OP_NAME / "lock"
    built = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions") / OP_NAME
    if (built / f"{OP_NAME}.so").is_file():
        shutil.copytree(built, lock.parent, ignore=shutil.ignore_patterns("lock"))
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    old = time.time() - STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    code = ("import torch.distributed as d; from runtime.distributed import main; main(); "
            "assert not d.is_initialized()")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "removing stale build lock" in out.stderr
    assert "warm_ops: DeepSpeed CPU ops ready" in out.stdout or "gloo will be used" in out.stderr


def test_the_op_is_built_inside_this_environment():
    """Two checkouts with their own .venv must not share (and rebuild under one lock) the op's build directory;
    a user's own TORCH_EXTENSIONS_DIR wins."""
    code = ("import sys; from runtime.distributed import use_environment_extension_dir as use; "
            "from torch.utils.cpp_extension import _get_build_directory as build_dir; "
            "print(use(), build_dir('x', False), sys.prefix)")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    for given in (None, "/elsewhere"):
        run_env = env if given is None else dict(env, TORCH_EXTENSIONS_DIR=given)
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=120)
        used, build, prefix = out.stdout.split()
        assert used == (given or os.path.join(prefix, "torch_extensions")) and build.startswith(used), out.stderr
