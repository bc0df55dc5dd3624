"""What a test session must not leave running when the interpreter exits (tests/conftest.py checks it).

Issue #14: after every test passed, the pytest process sometimes died with SIGSEGV at exit (a heap fault in
libc). The pytest process then still held a torch.distributed gloo process group: the in-process reward-model
trainer tests made one (DeepSpeed, world size 1) and nothing destroyed it, so its TCPStore and gloo's worker
threads (`gloo_tcp_loop`, `pt_gloo_runloop`, `pt_tcpstore_uv`) were still running while Python finalized and
freed the tensors and objects they use: the crash class of pytorch/pytorch#179291 and #190489 (a process that
exits without `destroy_process_group`). DeepSpeed keeps its groups for the life of a process, so such tests now
run in a fresh child process (tests/fresh_process.py) and the CLIs destroy their group before exiting.

`leftovers()` lists what would be torn down at exit: a process group, a connected Ray driver, native gloo /
TCPStore threads, non-daemon Python threads (an unclosed TensorBoard writer's, a loader's), and child processes
still running (a server a skipped test started and never stopped, issue #28). Ray's own native
threads that outlive `ray.shutdown()` (its GCS client io_service, a function-local static in the core worker
library, and gRPC's pollers) are Ray's design and are not counted.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import List

# Native threads of torch.distributed's gloo backend and its TCPStore (names as the kernel reports them).
NATIVE_THREAD_MARKERS = ("gloo", "tcpstore")


def native_thread_names() -> List[str]:
    names = []
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ():
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            continue  # the thread ended while we listed
    return names


def native_threads(grace_s: float) -> List[str]:
    """gloo/TCPStore threads still running. `destroy_process_group` returns before the TCPStore's libuv thread
    (`pt_tcpstore_uv`) has ended: it stops asynchronously, so a check right after the destroy can still see it
    (a CI run did). Wait up to `grace_s` for such threads to end before calling them left over."""
    deadline = time.monotonic() + grace_s
    while True:
        native = [n for n in native_thread_names() if any(m in n.lower() for m in NATIVE_THREAD_MARKERS)]
        if not native or time.monotonic() >= deadline:
            return native
        time.sleep(0.05)


# Children Python itself keeps to the end (multiprocessing's resource tracker, started by a spawn context).
PYTHON_OWN_CHILDREN = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def child_processes(grace_s: float) -> List[str]:
    """This process's descendants still running (zombies are gone already), as 'pid command'; waits up to
    `grace_s` for them to end (a server stopped with SIGTERM, Ray's processes after `ray.shutdown()`)."""
    import psutil

    deadline = time.monotonic() + grace_s
    while True:
        running = []
        for child in psutil.Process().children(recursive=True):
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                command = " ".join(child.cmdline())[:200]
            except psutil.NoSuchProcess:
                continue
            if not any(own in command for own in PYTHON_OWN_CHILDREN):
                running.append(f"{child.pid} {command}")
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.1)


def leftovers(grace_s: float = 5.0) -> List[str]:
    found = []
    torch = sys.modules.get("torch")
    group_alive = torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()
    if group_alive:
        found.append("a torch.distributed process group is initialized (destroy_process_group was not called)")
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        found.append("a Ray driver is still connected (ray.shutdown was not called)")
    native = native_threads(0.0 if group_alive else grace_s)  # a live group's threads will not end by waiting
    if native:
        found.append(f"native gloo/TCPStore threads still running: {sorted(native)}")
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon
               and t.is_alive()]
    if threads:
        found.append(f"non-daemon Python threads still running: {threads}")
    children = child_processes(grace_s)
    if children:
        found.append(f"child processes still running: {children}")
    return found
