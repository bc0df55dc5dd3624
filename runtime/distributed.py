"""Joining a process group: a free rendezvous port, single-process defaults, and `init_distributed`, whose
DeepSpeed CPU shared-memory communication op is built once, at install time (`python -m runtime.distributed`).

The first `deepspeed.init_distributed` on a machine JIT-compiles this op with g++ (about a minute,
cached under TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions); doing it in `make install` keeps that
minute out of the first test or training run. Without a C++ compiler DeepSpeed cannot build it; we
then say so and carry on: gloo still works for every collective.

`init_distributed` is how every process of ours joins a group (learner ranks, the reward trainer). It
first removes a stale build lock: torch's `cpp_extension.load` takes the lock file `<build dir>/lock` even
when the op is already built (to let ninja check it), and waits for it with no timeout. A process killed
while holding it (Ctrl-C, a Ray worker killed, a CI job cancelled) leaves it behind, and then every later
`deepspeed.init_distributed` on the machine hangs forever in `FileBaton.wait`: seen here.

The op is built under this Python environment (`<sys.prefix>/torch_extensions`, unless TORCH_EXTENSIONS_DIR is
set), not the per-user ~/.cache/torch_extensions: two checkouts with their own .venv (a fresh clone beside a
working copy) write different build.ninja files (their include paths differ), so through a shared directory
each one's processes rebuilt the op the other had just built, under the same lock, and a process killed in
one of those rebuilds hung the other checkout's runs (seen here: tests of both stalled on the lock).
"""

import os
import socket
import sys
import time
from pathlib import Path

OP_NAME = "deepspeed_shm_comm"  # DeepSpeed's ShareMemCommBuilder's op, built by init_distributed on CPU
# A build takes about a minute on 2 cores; a lock much older than that belongs to a dead process.
STALE_LOCK_S = 600.0


def free_port() -> int:
    """A TCP port free on this host now (a rendezvous or weight-group address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def single_process_defaults() -> None:
    """A one-rank group on this host, unless a launcher (torchrun, DeepSpeed's) set the rank variables."""
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")


def use_environment_extension_dir() -> str:
    """TORCH_EXTENSIONS_DIR for this process and its children: the environment's own, unless already set."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def clear_stale_build_lock(name: str = OP_NAME, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove `name`'s torch extension build lock when it is older than `max_age_s`; True if removed."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    print(f"warm_ops: removing stale build lock {lock} ({age / 60:.0f} min old; its process died while "
          "building) so DeepSpeed does not wait for it forever", file=sys.stderr)
    lock.unlink(missing_ok=True)
    return True


def init_distributed(backend: str) -> None:
    """`deepspeed.init_distributed`, after clearing a stale build lock of its CPU op."""
    import deepspeed

    use_environment_extension_dir()
    clear_stale_build_lock()
    deepspeed.init_distributed(dist_backend=backend)


def main() -> int:
    single_process_defaults()
    import torch

    try:
        init_distributed("gloo")
    except Exception as err:  # noqa: BLE001 - report and continue: this is only a cache warm-up
        print(f"warm_ops: DeepSpeed could not build its shm op ({err}); gloo will be used", file=sys.stderr)
        return 0
    torch.distributed.destroy_process_group()
    print("warm_ops: DeepSpeed CPU ops ready")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
