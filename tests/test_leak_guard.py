"""The session guard of tests/conftest.py sees what it must (checked in a child process, so the pytest
process itself never holds a process group)."""

import os

from tests.fresh_process import in_fresh_process
from tests.leak_guard import leftovers


def _with_and_without_a_group():
    import torch.distributed as dist

    from runtime.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    before = leftovers()
    dist.init_process_group("gloo", rank=0, world_size=1)
    dist.all_reduce(__import__("torch").ones(1))  # starts gloo's worker threads
    held = leftovers()
    dist.destroy_process_group()
    return before, held, leftovers()


def test_guard_reports_a_live_process_group_and_its_threads():
    before, held, after = in_fresh_process(_with_and_without_a_group)
    assert before == [] and after == []
    assert any("process group is initialized" in f for f in held)
    assert any("native gloo/TCPStore threads" in f for f in held), held


def _with_a_live_thread():
    import threading

    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="left-running")
    t.start()
    found = leftovers()
    stop.set()
    t.join()
    return found, leftovers()


def test_guard_reports_a_non_daemon_thread():
    held, after = in_fresh_process(_with_a_live_thread)
    assert any("left-running" in f for f in held) and after == []


def _with_a_child_process():
    import subprocess

    child = subprocess.Popen(["sleep", "60"])
    found = leftovers(grace_s=0.0)
    child.kill()
    child.wait()
    return child.pid, found, leftovers()


def test_guard_reports_a_child_process_left_running():
    pid, held, after = in_fresh_process(_with_a_child_process)
    assert any("child processes still running" in f and f"{pid} sleep 60" in f for f in held), held
    assert after == []


def test_this_process_holds_no_process_group_now():
    assert not any("process group" in f for f in leftovers())
